"""Credentials out of text: the one redaction rule for everything flowscore shows or stores
(error messages, warnings, log lines, ``runs`` rows, MLflow parameters; DESIGN promise 8).

:func:`redact` masks

* the user info of any URI, user name and password alike: ``postgresql://bob:pw@db/x`` →
  ``postgresql://***@db/x``, ``s3://KEY:SECRET@bucket/x`` → ``s3://***@bucket/x`` (AWS
  secrets may hold ``/``; a password may hold ``@``, ``#`` or ``?``: with a password, all
  up to the URI's last ``@`` goes, erring on the side of hiding too much);
* the value of every ``name=value`` whose name looks like a credential, in a query string
  (``?X-Amz-Signature=…&X-Amz-Credential=…&X-Amz-Security-Token=…``, ``&sig=…``,
  ``?key=…``) or in a libpq-style ``key=value`` list (``password=…``, ``sslpassword=…``,
  quoted values included): ``name=***``;
* ``Bearer``/``Basic`` authorization values: ``Bearer ***``.

It is idempotent and never raises. :func:`is_secret_name` is the name test, also used to
drop credential-looking keys from MLflow parameters (:func:`pipelines.tracking.safe_params`).
"""

from __future__ import annotations

import re

__all__ = ["redact", "is_secret_name", "has_userinfo", "MASK"]

MASK = "***"

# Matched against a name with ``_ - . space`` removed, lower-cased, so ``apiKey``,
# ``api-key``, ``API_KEY`` and ``X-Amz-Security-Token`` all count.
_SECRET_WORDS = (
    "secret",
    "password",
    "passwd",
    "pwd",
    "token",
    "credential",
    "accesskey",
    "apikey",
    "privatekey",
    "authorization",
    "signature",
)
# query parameters that carry a credential under a short name: Azure SAS ``sig``, API
# ``key``, ``sslkey``-style names, ``auth``
_SECRET_PARAM_EXACT = frozenset({"sig", "key", "auth", "sas", "apiauth"})

_USERINFO_RE = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)"
    # ``user:secret@`` where the secret runs to the last '@' of the URI and may hold '/',
    # '?', '#' or '@' (AWS secret keys hold '/'), unless ``:`` starts a port
    # (``host:8080/path?mail=a@b`` is not user info); or plain user info, up to the last
    # '@' before the path
    r"(?:[^/?#@\s\"'<>:]+:(?!\d*(?:[/?#\s\"'<>]|$))[^\s\"'<>]*@|[^/?#\s\"'<>]*@)"
)
# ``name=value`` after a query/list separator or at the start of the text; the value runs
# to the next separator, or is one quoted string (libpq: ``password='a b'``)
_PARAM_RE = re.compile(
    r"(?P<lead>(?:^|[?&;\s,(\[{]))(?P<name>[A-Za-z_][\w.\-]*)(?P<eq>\s*=\s*)"
    r"(?P<value>'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^&#\s\"'<>;]*)"
)
_AUTH_HEADER_RE = re.compile(r"\b(?P<kind>Bearer|Basic)\s+(?!\*\*\*)[A-Za-z0-9\-._~+/=]+")


def _norm(name: str) -> str:
    return re.sub(r"[\s_.\-]", "", name).lower()


def is_secret_name(name: str) -> bool:
    """Whether a parameter, setting or mapping key named ``name`` holds a credential."""
    norm = _norm(name)
    return any(word in norm for word in _SECRET_WORDS)


def _is_secret_param(name: str) -> bool:
    norm = _norm(name)
    return is_secret_name(name) or norm in _SECRET_PARAM_EXACT or norm.endswith("key")


def has_userinfo(uri: str) -> bool:
    """Whether ``uri`` (``scheme://…``) carries user info (``user[:password]@``)."""
    m = _USERINFO_RE.match(uri.strip())
    return m is not None and m.end() > len(m.group("scheme"))


def redact(text: str) -> str:
    """``text`` with URI user info, credential-looking ``name=value`` values and
    authorization header values replaced by ``***`` (see the module's docstring)."""
    if not isinstance(text, str):
        text = str(text)
    if "://" in text:
        text = _USERINFO_RE.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    if "=" in text:

        def _param(m: re.Match[str]) -> str:
            if not _is_secret_param(m.group("name")):
                return m.group(0)
            return f"{m.group('lead')}{m.group('name')}{m.group('eq')}{MASK}"

        text = _PARAM_RE.sub(_param, text)
    if "Bearer" in text or "Basic" in text:
        text = _AUTH_HEADER_RE.sub(lambda m: f"{m.group('kind')} {MASK}", text)
    return text
