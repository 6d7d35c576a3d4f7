"""S3 timeouts and retries, and the line between a passing outage and a lasting one.

DESIGN promise 5: a transient S3 outage is retried with backoff; a lasting one ends the run
with a clear message and nothing half-committed. Every S3 request flowscore makes is bounded
by four settings, read from the environment of the process that talks to S3 (the driver, and
Ray's tasks: a local Ray inherits the driver's environment, and
:func:`pipelines.raycluster.ensure_ray` passes them on to a remote cluster):

``FLOWSCORE_S3_CONNECT_TIMEOUT_S`` (default 10)
    seconds to open a connection to the S3 endpoint.
``FLOWSCORE_S3_READ_TIMEOUT_S`` (default 60)
    seconds one request may wait for data (botocore's read timeout; pyarrow's request
    timeout).
``FLOWSCORE_S3_RETRIES`` (default 3)
    retries of one failed request by the S3 client itself (so at most 1 + N attempts), with
    exponential backoff and jitter: botocore's ``standard`` mode for the archive (s3fs), the
    AWS SDK's standard strategy for the warehouse (pyarrow).
``FLOWSCORE_S3_RETRY_BUDGET_S`` (default 120)
    how long flowscore goes on retrying, with its own exponential backoff (1 s doubling up
    to 30 s), an operation that still fails after the client's retries: reading an image,
    listing the archive, writing a table's data files and committing. Past it the run stops.

Where they apply:

* Archive (s3fs, :mod:`pipelines.archive`): botocore ``connect_timeout``/``read_timeout``/
  ``retries`` via :func:`s3fs_kwargs`; s3fs's own retry loop is set to one attempt
  (:data:`S3FS_RETRIES`: s3fs nests it, so it would multiply the client's retries by 25).
  :func:`retry_transient` wraps reads and listings: transient errors (:func:`is_transient`:
  timeouts, connection errors, HTTP 5xx, throttling) are retried within the budget, then
  :class:`StorageUnavailable` is raised; a missing file or a denied access is not retried.
* Warehouse (pyiceberg's PyArrow FileIO, in the driver and in Ray's write tasks):
  ``s3.connect-timeout``, ``s3.request-timeout`` and ``s3.retry-strategy-impl``
  (:class:`S3RetryStrategy`), via :func:`iceberg_properties`.
* Ray Data's ``write_iceberg`` retries writing data files and the commit on its own;
  :func:`configure_ray_data` sizes those retries to the budget and adds the AWS SDK's
  network errors to what its commit retries.

Worst case for a lasting outage: a refused connection or an HTTP 5xx fails at once, so a run
stops about one budget after the outage began. A server that accepts connections but never
answers costs a full read timeout per attempt: reads then stop after at most the budget plus
``(1 + retries) × read timeout``; a table write can take up to the number of Ray's write
attempts (:func:`backoff_attempts`) times that.

Nothing here imports s3fs, botocore, Ray or pyiceberg at module level.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from .errors import exception_chain, one_line
from .redact import redact
from .settings import (
    CONNECT_TIMEOUT_ENV,
    READ_TIMEOUT_ENV,
    RETRIES_ENV,
    RETRY_BUDGET_ENV,
    S3Settings,
    SettingError,
    Settings,
    current,
)

__all__ = [
    "CONNECT_TIMEOUT_ENV",
    "READ_TIMEOUT_ENV",
    "RETRIES_ENV",
    "RETRY_BUDGET_ENV",
    "S3_ENV",
    "S3FS_RETRIES",
    "S3Settings",
    "S3RetryStrategy",
    "StorageConfigError",
    "StorageUnavailable",
    "backoff_attempts",
    "configure_ray_data",
    "endpoint",
    "iceberg_properties",
    "is_transient",
    "retry_transient",
    "s3_settings",
    "s3fs_kwargs",
    "storage_failure",
]

S3_ENV = (CONNECT_TIMEOUT_ENV, READ_TIMEOUT_ENV, RETRIES_ENV, RETRY_BUDGET_ENV)
"""The settings' environment variables (passed to a remote Ray cluster's workers)."""

S3FS_RETRIES = 1
"""Attempts of s3fs's own retry loop (it nests inside itself around botocore's retries)."""

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0

_log = logging.getLogger("flowscore.storage")
_R = TypeVar("_R")


class StorageConfigError(SettingError):
    """A ``FLOWSCORE_S3_*`` variable has a bad value (exit code 2)."""


class StorageUnavailable(RuntimeError):
    """S3 did not answer (or kept failing) for longer than the retry budget.

    Raised by :func:`retry_transient`; one line that names what was being done, the URI and
    the endpoint, credentials redacted (:func:`pipelines.redact.redact`: presigned URLs,
    user info). It ends a scoring run (it is not a per-file error row). Picklable, so it
    travels from a Ray task to the driver intact.
    """

    def __init__(self, message: str) -> None:
        message = redact(message)
        self.message = message
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


def s3_settings() -> S3Settings:
    """The S3 limits from the environment (defaults where unset; the process's own: a Ray
    worker reads the variables Ray passed it).

    Raises:
        StorageConfigError: a variable is set to something that is not a valid number.
    """
    return S3Settings.from_env(error=StorageConfigError)


def endpoint(settings: Settings | None = None) -> str:
    """The S3 endpoint in use, for messages: ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, else
    AWS's own."""
    s = settings or current()
    if s.s3_endpoint:
        return redact(s.s3_endpoint)
    return f"AWS S3 ({s.s3_region})" if s.s3_region else "AWS S3"


# ---------------------------------------------------------------- client configuration


def s3fs_kwargs(settings: S3Settings | None = None) -> dict[str, Any]:
    """Keyword arguments for ``s3fs.S3FileSystem``: botocore timeouts and retries."""
    s = settings or s3_settings()
    return {
        "config_kwargs": {
            "connect_timeout": s.connect_timeout_s,
            "read_timeout": s.read_timeout_s,
            "retries": {"max_attempts": 1 + s.retries, "mode": "standard"},
        }
    }


class S3RetryStrategy(pafs.AwsStandardS3RetryStrategy):
    """pyarrow's AWS standard retry strategy with ``1 + FLOWSCORE_S3_RETRIES`` attempts.

    pyiceberg builds it from its class path (``s3.retry-strategy-impl``) with no arguments,
    in whichever process opens the warehouse, so it reads the environment there."""

    def __init__(self, max_attempts: int | None = None) -> None:
        if max_attempts is None:
            max_attempts = 1 + s3_settings().retries
        super().__init__(max_attempts=max_attempts)


def ray_train_storage(
    uri: str, settings: Settings | None = None
) -> tuple[str, pafs.FileSystem | None]:
    """Ray Train's ``(storage_path, storage_filesystem)`` for a checkpoint location: a folder
    every node can reach (absolute path, no file system object) or ``s3://bucket/prefix``
    (a pyarrow S3 file system on this environment's endpoint and region, with the
    ``FLOWSCORE_S3_*`` timeouts and retries; credentials from the AWS chain, as Ray's own
    workers take them; the path without its scheme, as Ray wants with a file system)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return os.path.abspath(parsed.path if parsed.scheme else uri), None
    if parsed.scheme not in ("s3", "s3a", "s3n") or not parsed.netloc:
        raise ValueError(f"expected a folder or s3://bucket/prefix, got {redact(uri)!r}")
    if "@" in parsed.netloc:
        raise ValueError("put S3 credentials in the AWS environment, not in the URI")
    settings = settings or current()
    s = settings.s3
    kwargs: dict[str, Any] = {
        "connect_timeout": s.connect_timeout_s,
        "request_timeout": s.read_timeout_s,
        "retry_strategy": S3RetryStrategy(1 + s.retries),
    }
    if settings.s3_endpoint:
        ep = urlparse(settings.s3_endpoint)
        kwargs["endpoint_override"] = ep.netloc or ep.path
        kwargs["scheme"] = ep.scheme or "https"
    if settings.s3_region:
        kwargs["region"] = settings.s3_region
    return f"{parsed.netloc}{parsed.path}".rstrip("/"), pafs.S3FileSystem(**kwargs)


def iceberg_properties(settings: S3Settings | None = None) -> dict[str, str]:
    """pyiceberg FileIO properties (plain strings) for an ``s3://`` warehouse."""
    s = settings or s3_settings()
    return {
        "s3.connect-timeout": f"{s.connect_timeout_s:g}",
        "s3.request-timeout": f"{s.read_timeout_s:g}",
        "s3.retry-strategy-impl": f"{__name__}.{S3RetryStrategy.__name__}",
    }


def backoff_attempts(budget_s: float, max_backoff_s: float) -> int:
    """Attempts whose binary exponential backoff (1, 2, 4 … s, capped at ``max_backoff_s``)
    adds up to at least ``budget_s``: how Ray's ``call_with_retry`` is sized to the budget."""
    attempts, waited = 1, 0.0
    while waited < budget_s:
        waited += min(2.0 ** (attempts - 1), max_backoff_s)
        attempts += 1
    return attempts


# AWS SDK (pyarrow) errors that mean "the service is not answering"; regular expressions,
# as Ray Data matches them
_AWS_TRANSIENT = (
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error SLOW_DOWN",
    "AWS Error THROTTLING",
    "AWS Error INTERNAL_FAILURE",
    "AWS Error REQUEST_TIMEOUT",
    r"AWS Error UNKNOWN \(HTTP status (5\d\d|429)\)",
)
_AWS_TRANSIENT_RE = re.compile("|".join(f"(?:{p})" for p in _AWS_TRANSIENT))


def configure_ray_data(settings: S3Settings | None = None) -> None:
    """Size Ray Data's own Iceberg retries (data files, catalog and commit) to the budget,
    and let its commit retry the AWS SDK's network errors too. Applies to the datasinks
    created afterwards in this process (each takes the current ``DataContext`` along)."""
    from ray.data import DataContext

    s = settings or s3_settings()
    ctx = DataContext.get_current()
    cfg = ctx.iceberg_config
    max_backoff = int(max(1.0, min(MAX_BACKOFF_S, s.retry_budget_s / 4)))
    attempts = backoff_attempts(s.retry_budget_s, max_backoff)
    cfg.write_file_max_attempts = attempts
    cfg.write_file_retry_max_backoff_s = max_backoff
    cfg.catalog_max_attempts = attempts
    cfg.catalog_retry_max_backoff_s = max_backoff
    # extended in place (assigning retried_io_errors makes Ray warn of a deprecation)
    for patterns, extra in (
        (cfg.catalog_retried_errors, (*_AWS_TRANSIENT, "Timeout was reached")),
        (ctx.retried_io_errors, _AWS_TRANSIENT),
    ):
        patterns.extend(p for p in extra if p not in patterns)


# ---------------------------------------------------------------- what is transient

_PERMANENT: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)
_TRANSIENT_ERRNOS = {
    errno.EBUSY,  # s3fs: SlowDown, ServiceUnavailable, 503, 409
    errno.EREMOTEIO,  # s3fs: InternalError, 500
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
}
# botocore / aiohttp exception classes (by name, anywhere in the MRO) that are network faults
_TRANSIENT_CLASSES = {
    "HTTPClientError",  # ReadTimeoutError, ConnectionClosedError, ProxyConnectionError …
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "ClientConnectionError",  # aiohttp
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "IncompleteRead",  # http.client
}
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
}


def _client_error_is_transient(e: BaseException) -> bool | None:
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    err = response.get("Error") or {}
    code = str(err.get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in _TRANSIENT_CODES or (code.isdigit() and (int(code) >= 500 or int(code) == 429)):
        return True
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True
    return False


def is_transient(e: BaseException) -> bool:
    """True for an error that a later attempt may not have: a timeout, a refused, reset or
    dropped connection, HTTP 5xx or 429, throttling (as s3fs, botocore, aiohttp or pyarrow
    raise them). False for a missing object, a denied access and everything else."""
    if isinstance(e, StorageUnavailable):
        return False
    if isinstance(e, _PERMANENT):
        return False
    if isinstance(e, TimeoutError | ConnectionError):  # builtins; asyncio's timeout too
        return True
    if any(c.__name__ in _TRANSIENT_CLASSES for c in type(e).__mro__):
        return True
    verdict = _client_error_is_transient(e)
    if verdict is not None:
        return verdict
    if _AWS_TRANSIENT_RE.search(str(e)):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    if isinstance(e, OSError) and e.errno == errno.EIO and e.__cause__ is not None:
        # s3fs: an S3 error code it has no mapping for; judge by the original response
        return bool(_client_error_is_transient(e.__cause__))
    return False


def retry_transient(
    action: Callable[[], _R],
    what: str,
    uri: str,
    settings: S3Settings | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> _R:
    """Run ``action``; while it fails with a transient error (:func:`is_transient`), wait and
    run it again, with exponential backoff and jitter (1 s doubling up to 30 s), for as long
    as the retry budget allows. Other errors propagate at once, unchanged.

    Raises:
        StorageUnavailable: still failing when the next wait would pass the budget; one
            line naming ``what``, ``uri``, the endpoint, how long it tried and the last error.
    """
    s = settings or s3_settings()
    t0 = clock()
    delay = FIRST_BACKOFF_S
    attempt = 0
    while True:
        attempt += 1
        try:
            return action()
        except Exception as e:
            if not is_transient(e):
                raise
            elapsed = clock() - t0
            wait = delay * random.uniform(0.8, 1.2)
            if elapsed + wait > s.retry_budget_s:
                raise StorageUnavailable(
                    f"S3 storage unavailable: could not {what} {uri} at {endpoint()} "
                    f"for {elapsed:.0f} s ({attempt} attempt(s), each with up to "
                    f"{s.retries} retries; {RETRY_BUDGET_ENV}={s.retry_budget_s:g}): "
                    f"{one_line(e)}"
                ) from e
            _log.warning(
                "S3 %s %s failed (%s); retrying in %.1f s", what, redact(uri), one_line(e), wait
            )
            sleep(wait)
            delay = min(delay * 2, MAX_BACKOFF_S)


# ---------------------------------------------------------------- reporting


_UNAVAILABLE_LINE = re.compile(
    rf"^(?:{re.escape(__name__)}\.)?{StorageUnavailable.__name__}: (.+)$", re.MULTILINE
)
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?\w*(?:Error|Exception)\w*: .+$", re.MULTILINE)


def storage_failure(e: BaseException) -> str | None:
    """One line for an exception that ended a run because S3 was unavailable, or ``None``.

    Finds a :class:`StorageUnavailable` anywhere behind ``e``, also inside a Ray task error
    (Ray Data re-raises a task's exception as ``UserCodeException`` and keeps the original
    only as text in the message); else a transient S3 error (e.g. pyarrow's ``AWS Error
    NETWORK_CONNECTION`` from a table write that outlasted Ray's and the client's retries)."""
    chain = list(exception_chain(e))
    for x in chain:
        if isinstance(x, StorageUnavailable):
            message = getattr(x, "message", None)
            return redact(message) if isinstance(message, str) else one_line(x)
    for x in chain:
        found = _UNAVAILABLE_LINE.search(str(x))
        if found:
            return redact(found.group(1).strip())
    for x in chain:
        if is_transient(x) and _looks_like_s3(x):
            return redact(
                f"S3 storage unavailable at {endpoint()} (still failing after the retries "
                f"of {RETRIES_ENV} and {RETRY_BUDGET_ENV}): {_error_line(x)}"
            )
    return None


def _error_line(e: BaseException) -> str:
    """The line of ``e``'s text that says what failed: in a Ray task error (a remote
    traceback) the ``Type: message`` line, preferring an AWS SDK error."""
    text = str(e)
    lines = [m.group(0).strip() for m in _ERROR_LINE.finditer(text)]
    aws = [line for line in lines if "AWS Error" in line]
    if aws or lines:
        line = redact((aws or lines)[0])
        return line if len(line) <= 300 else line[:297] + "..."
    return one_line(e)


def _looks_like_s3(e: BaseException) -> bool:
    text = str(e)
    if "AWS Error" in text or "s3://" in text:
        return True
    modules = {c.__module__.split(".")[0] for c in type(e).__mro__}
    return bool(modules & {"botocore", "aiobotocore", "s3fs", "aiohttp"})
