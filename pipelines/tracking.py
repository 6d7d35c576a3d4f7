"""MLflow adapter: experiments, parameters, metrics, the model registry and model resolution.

Everything goes through an explicit :class:`mlflow.MlflowClient` built by :func:`client`,
from one process (the driver); nothing here touches MLflow's fluent, process-global run
state (``mlflow.start_run`` and friends), so Ray workers never need MLflow at all.

Stores (see "Embedded defaults" in DESIGN.md):

* Default: ``sqlite:///$FLOWSCORE_HOME/mlflow.db`` with artifacts under
  ``$FLOWSCORE_HOME/mlartifacts/<experiment>``. :func:`ensure_experiment` gives every
  experiment it creates in a non-server store an *absolute* ``file://`` artifact location;
  MLflow's own default is relative to the working directory of whichever process created
  the experiment.
* Production: ``$MLFLOW_TRACKING_URI`` naming an MLflow server (``http(s)://``). The server
  chooses the artifact location (proxied ``mlflow-artifacts:/`` artifacts).

The tracking store doubles as the model registry. A model bundle (a directory with
``flowscore.json`` and ``weights.safetensors``, see :mod:`flowcore.bundle`) is logged as
plain artifacts of the training run; :func:`register_bundle` registers that artifact path as a
new version of a registered model (no ``mlflow.pytorch``/pyfunc flavour, nothing pickled).
:func:`resolve_model` turns ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local
directory into a local bundle directory, resolving an alias exactly once.

Failure model: :func:`client` bounds MLflow's HTTP retries so an unreachable server fails in
seconds (a short outage is still ridden out by MLflow's retries with backoff); talking to an
unreachable store raises :class:`TrackingError`; a model URI that cannot be resolved raises
:class:`ModelResolutionError` with one line saying what exists and what to do.

No credentials become MLflow parameters: :func:`safe_params` (also applied by
:func:`log_params`) drops credential-looking keys and scrubs user info and signed query
parameters from URIs (DESIGN promise 8).

MLflow itself is imported lazily, inside the functions that need it; importing this module
costs nothing, and nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from .errors import exception_chain, one_line
from .paths import flowscore_home
from .redact import is_secret_name, redact
from .settings import MlflowHttp, Settings, current

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "BUNDLE_META_FILE",
    "CACHE_MARKER_FILE",
    "DEFAULT_ALIAS",
    "HTTP_MAX_RETRIES",
    "HTTP_TIMEOUT_S",
    "http_request_budget_s",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_PARAMS_PER_BATCH",
    "RUN_ID_TAG",
    "ModelResolutionError",
    "ResolvedModel",
    "TrackingError",
    "check_reachable",
    "client",
    "ensure_experiment",
    "failure_reason",
    "log_metrics",
    "log_params",
    "register_bundle",
    "resolve_model",
    "safe_params",
    "scrub_text",
    "tracking_uri",
]

DEFAULT_ALIAS = "champion"
RUN_ID_TAG = "flowscore.run_id"
BUNDLE_META_FILE = "flowscore.json"
#: Written into each cached model directory: which registry entry it was downloaded from.
CACHE_MARKER_FILE = ".flowscore-cache.json"

#: MLflow limits (``mlflow.utils.validation`` in 3.17).
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAM_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

#: flowscore's MLflow HTTP limits (:class:`pipelines.settings.MlflowHttp`, which explains them)
HTTP_MAX_RETRIES = MlflowHttp.max_retries
HTTP_TIMEOUT_S = MlflowHttp.timeout_s
#: urllib3's cap on one backoff sleep
_URLLIB3_BACKOFF_MAX_S = 120.0

_SERVER_SCHEMES = ("http", "https")
_ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
_DOES_NOT_EXIST = "RESOURCE_DOES_NOT_EXIST"
_INVALID_VALUE = "INVALID_PARAMETER_VALUE"


class TrackingError(RuntimeError):
    """The tracking store or registry cannot be used; the message names the URI and the fix."""


class ModelResolutionError(ValueError):
    """A model URI that does not resolve to a bundle; the message is one line saying why."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI resolved to a local bundle directory.

    ``uri`` is the URI as given; ``name`` and ``version`` are the registered model and the
    version an alias resolved to (both ``None`` for a local directory); ``path`` is the local
    bundle directory (the caller loads it, e.g. with ``flowcore.bundle.load_bundle``).
    """

    uri: str
    name: str | None
    version: str | None
    path: Path

    @property
    def pinned_uri(self) -> str:
        """``models:/NAME/VERSION`` for a registry model, else the bundle directory."""
        if self.name is not None and self.version is not None:
            return f"models:/{self.name}/{self.version}"
        return str(self.path)


# ---------------------------------------------------------------------------------------
# URIs and clients
# ---------------------------------------------------------------------------------------


def tracking_uri(settings: Settings | None = None) -> str:
    """The tracking (and registry) URI: ``$MLFLOW_TRACKING_URI``, else the embedded store.

    The embedded store is ``sqlite:///<flowscore_home()>/mlflow.db`` (an absolute path, so
    the URI has four slashes on POSIX).
    """
    s = settings or current()
    if s.mlflow_uri.startswith(f"sqlite:///{s.home.as_posix()}/"):
        flowscore_home(s)  # the embedded store lives there: create it
    return s.mlflow_uri


def _is_server(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (rather than a database or directory)."""
    scheme = urlsplit(uri).scheme.lower()
    return scheme in _SERVER_SCHEMES or scheme.startswith("databricks") or uri == "databricks"


def _store_kind(uri: str) -> str:
    return "server" if _is_server(uri) else "store"


def client(uri: str | None = None, settings: Settings | None = None) -> MlflowClient:
    """An :class:`mlflow.MlflowClient` for ``uri`` (default :func:`tracking_uri` of
    ``settings``).

    Tracking and registry use the same store. MLflow's HTTP limits come from its own
    ``MLFLOW_HTTP_REQUEST_*`` variables, which the CLI sets from the settings
    (:class:`pipelines.settings.MlflowHttp`) before any command runs; a library caller sets
    them itself (MLflow's defaults retry a dead server for minutes).
    """
    from mlflow import MlflowClient

    # MLflow announces at INFO that it creates or migrates a SQLite store's tables, on the
    # first command of every new home; flowscore's own output says what it does
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    resolved = uri or tracking_uri(settings)
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved)


def http_request_budget_s(settings: Settings | None = None) -> float:
    """The longest one MLflow HTTP request can take to fail, in seconds, under ``settings``
    (their ``mlflow_http``; None: read from the environment): every attempt waits the full
    ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (a server that accepts connections but never answers,
    or a host that never accepts), ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` + 1 attempts, and
    urllib3's backoff before each retry but the first (``factor · 2^(k-1)`` plus up to
    ``jitter`` seconds before the k-th, each capped at 120 s).

    A command that fails on an unreachable server makes one request before it gives up, so
    this bounds how long it hangs (plus its start-up)."""
    http = (settings or current()).mlflow_http
    retries, timeout = http.max_retries, http.timeout_s
    factor, jitter = http.backoff_factor, http.backoff_jitter
    backoff = sum(
        min(_URLLIB3_BACKOFF_MAX_S, factor * 2 ** (k - 1) + jitter) for k in range(2, retries + 1)
    )
    return (retries + 1) * timeout + backoff


def _server_failure(exc: BaseException) -> str | None:
    """A short reason why requests to a server failed (refused, no answer in time), with the
    number of attempts; None when the cause chain says neither."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError

    http = current().mlflow_http
    attempts, timeout = http.max_retries + 1, http.timeout_s
    causes = list(exception_chain(exc))
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return f"connection refused ({attempts} attempt(s))"
    if any(isinstance(c, ReadTimeoutError) for c in causes):
        return f"connected but no answer within {timeout:g} s ({attempts} attempt(s))"
    # urllib3 2 makes NewConnectionError (DNS, no route, ...) a ConnectTimeoutError
    if any(
        isinstance(c, ConnectTimeoutError) and not isinstance(c, NewConnectionError) for c in causes
    ):
        return f"could not connect within {timeout:g} s ({attempts} attempt(s))"
    return None


def failure_reason(exc: BaseException) -> str:
    """One short line saying why talking to the tracking store failed (``connection refused
    (3 attempt(s))``, ``connected but no answer within 10 s …``, else the first line of the
    underlying error), credentials scrubbed; for warnings that already name the store."""
    if isinstance(exc, TrackingError) and exc.__cause__ is not None:
        return _server_failure(exc) or one_line(exc.__cause__, with_type=False)
    return _server_failure(exc) or one_line(exc, with_type=False)


def _is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything in its cause chain) says the store could not be reached."""
    import requests
    from sqlalchemy.exc import OperationalError  # a dependency of mlflow

    unreachable = requests.RequestException | ConnectionError | TimeoutError | OperationalError
    return any(isinstance(cur, unreachable) for cur in exception_chain(exc))


def _unreachable_message(uri: str, doing: str, exc: BaseException) -> str:
    safe_uri = redact(uri)
    if _is_server(uri):
        fix = (
            "start the server or fix MLFLOW_TRACKING_URI (unset it to use the embedded store "
            "under FLOWSCORE_HOME)"
        )
    else:
        fix = "check that the path exists and is writable, or set MLFLOW_TRACKING_URI"
    what = f" while {doing}" if doing else ""
    why = (_server_failure(exc) if _is_server(uri) else None) or one_line(exc, with_type=False)
    return f"MLflow tracking {_store_kind(uri)} at {safe_uri} is not reachable{what}: {why}; {fix}"


@contextmanager
def _talking_to(uri: str, doing: str) -> Iterator[None]:
    """Turn "could not reach the store" failures inside the block into :class:`TrackingError`."""
    try:
        yield
    except (TrackingError, ModelResolutionError):
        raise
    except Exception as exc:
        if _is_unreachable(exc):
            raise TrackingError(_unreachable_message(uri, doing, exc)) from exc
        raise


def _error_code(exc: BaseException) -> str | None:
    code = getattr(exc, "error_code", None)
    return str(code) if code is not None else None


def check_reachable(c: MlflowClient, uri: str) -> None:
    """Make one cheap call to the store; raise :class:`TrackingError` if it fails.

    With the bounds :func:`client` sets, a refused connection fails in about 5 s.
    """
    try:
        c.search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(_unreachable_message(uri, "", exc)) from exc


# ---------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------


def _path_segment(text: str) -> str:
    """A single safe path component for ``text`` (an experiment or model name, a version).

    Characters outside ``[A-Za-z0-9._-]`` become ``_``; when anything had to change, a short
    hash of the original is appended so different names never share a directory.
    """
    seg = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    if seg.strip(".") == "":
        seg = "_" + seg
    if seg != text:
        seg = f"{seg}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return seg


def ensure_experiment(
    c: MlflowClient,
    name: str,
    *,
    artifact_location: str | None = None,
    settings: Settings | None = None,
) -> str:
    """Return the id of experiment ``name``, creating it if missing (restoring it if deleted).

    A new experiment in a non-server store (SQLite, a database URL, a local directory) gets the
    absolute artifact location ``(flowscore_home(settings)/"mlartifacts"/name).as_uri()`` (each
    ``/``-separated part of ``name`` made a safe path component, so ``flowscore-train/grain``
    becomes ``mlartifacts/flowscore-train/grain``), unless ``artifact_location`` is given.
    On an ``http(s)`` server the server chooses (proxied artifacts). Losing a creation race
    to another process is fine: the experiment is looked up again.
    """
    from mlflow.exceptions import MlflowException

    uri = c.tracking_uri
    with _talking_to(uri, f"looking up experiment {name!r}"):
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                c.restore_experiment(exp.experiment_id)
            return str(exp.experiment_id)
        location = artifact_location
        if location is None and not _is_server(uri):
            parts = [_path_segment(part) for part in name.split("/") if part] or ["_"]
            location = flowscore_home(settings).joinpath("mlartifacts", *parts).as_uri()
        try:
            return str(c.create_experiment(name, artifact_location=location))
        except MlflowException as exc:
            if _error_code(exc) != _ALREADY_EXISTS:
                raise
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise TrackingError(
                f"experiment {name!r} in {redact(uri)} was reported as existing but cannot "
                "be found; if it was deleted, restore or purge it (`mlflow gc`) and try again"
            )
        return str(exp.experiment_id)


# ---------------------------------------------------------------------------------------
# Parameters and metrics
# ---------------------------------------------------------------------------------------

_KEY_BAD_CHARS = re.compile(r"[^/\w.\- :]")

# The project's one redaction rule (pipelines.redact), under the name jobs/train.py uses.
scrub_text = redact


def _drop_secrets(value: Any) -> Any:
    """A JSON-able copy of ``value`` without credential-looking mapping keys."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _drop_secrets(v) for k, v in value.items() if not is_secret_name(str(k))}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [_drop_secrets(v) for v in items]
    return value


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple | set | frozenset):
        text = json.dumps(_drop_secrets(value), default=str)
    else:
        text = str(value)
    text = redact(text)
    return text[:MAX_PARAM_VALUE_LENGTH]


def _param_key(key: str) -> str:
    """``key`` made acceptable to MLflow (allowed characters, unique as a path, ≤250 chars)."""
    key = _KEY_BAD_CHARS.sub("_", key) or "_"
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith("..") or norm.startswith("/"):
        key = key.replace("/", "_")
        if key.strip(".") == "":
            key = "_" + key
    return key[:MAX_PARAM_KEY_LENGTH]


def _flatten(d: Mapping[Any, Any], prefix: str, out: dict[str, str]) -> None:
    for raw_key, value in d.items():
        key = str(raw_key)
        if is_secret_name(key):
            continue
        full = f"{prefix}.{key}" if prefix else key
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            if value:
                _flatten(value, full, out)
            else:
                out[_param_key(full)] = "{}"
        else:
            out[_param_key(full)] = _param_value(value)


def safe_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten ``d`` into MLflow parameters that carry no credentials.

    Nested mappings (and dataclass instances) become dotted keys (``{"flow": {"blocks": 5}}``
    → ``flow.blocks``), under ``prefix`` if given; lists, tuples and sets become JSON text;
    everything else ``str(value)``. Values are cut to MLflow's 6000-character limit and keys
    made valid MLflow names. Any key whose own name looks like a credential (contains secret,
    password, passwd, pwd, token, credential, access_key, api_key, private_key,
    authorization or signature, in any case and separator style) is dropped with everything
    under it, also inside lists; user info and signed query parameters are scrubbed from URIs
    in values (see :func:`pipelines.redact.redact`).
    """
    out: dict[str, str] = {}
    _flatten(d, prefix.rstrip("."), out)
    return out


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def log_params(c: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log ``params`` to run ``run_id`` with ``log_batch``, at most 100 per request.

    ``params`` should come from :func:`safe_params`; it is passed through it again here (a
    no-op on its output), so credentials cannot slip in through this function.
    """
    from mlflow.entities import Param

    clean = safe_params(params)
    with _talking_to(c.tracking_uri, f"logging parameters of run {run_id}"):
        for chunk in _chunks(clean.items(), MAX_PARAMS_PER_BATCH):
            c.log_batch(run_id, params=[Param(k, v) for k, v in chunk])


def log_metrics(c: MlflowClient, run_id: str, rows: Iterable[tuple[str, float, int, int]]) -> None:
    """Log metric rows ``(key, value, step, timestamp_ms)`` to ``run_id``, ≤1000 per request."""
    from mlflow.entities import Metric

    with _talking_to(c.tracking_uri, f"logging metrics of run {run_id}"):
        for chunk in _chunks(rows, MAX_METRICS_PER_BATCH):
            metrics = [
                Metric(key=str(k), value=float(v), timestamp=int(ts), step=int(step))
                for k, v, step, ts in chunk
            ]
            c.log_batch(run_id, metrics=metrics)


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------


def register_bundle(
    c: MlflowClient,
    run_id: str,
    artifact_path: str,
    name: str,
    *,
    promote: bool,
    alias: str = DEFAULT_ALIAS,
    wait_s: float = 60,
) -> str:
    """Register the bundle logged under ``artifact_path`` of run ``run_id`` as a new version.

    Creates registered model ``name`` if missing, creates a version whose source is the run's
    artifact location joined with ``artifact_path`` (tagged ``flowscore.run_id``), waits up to
    ``wait_s`` seconds for it to be ``READY`` and, if ``promote``, points ``alias`` at it.
    Returns the version as a string. Raises :class:`TrackingError` if the run has no
    ``flowscore.json`` under ``artifact_path``, if registration fails or does not finish in
    time, or if the store is unreachable.
    """
    from mlflow.exceptions import MlflowException

    uri = c.tracking_uri
    safe_uri = redact(uri)
    path = artifact_path.strip("/")
    with _talking_to(uri, f"registering model {name!r}"):
        run = c.get_run(run_id)
        listed = {posixpath.basename(f.path) for f in c.list_artifacts(run_id, path or None)}
        if BUNDLE_META_FILE not in listed:
            raise TrackingError(
                f"run {run_id} in {safe_uri} has no flowscore bundle at artifact path "
                f"{path!r} (no {BUNDLE_META_FILE} there); log the bundle directory as "
                "artifacts of the run before registering it"
            )
        try:
            c.create_registered_model(name, description="flowscore anomaly scorer")
        except MlflowException as exc:
            if _error_code(exc) != _ALREADY_EXISTS:
                raise
        root = run.info.artifact_uri.rstrip("/")
        source = f"{root}/{path}" if path else root
        mv = c.create_model_version(
            name, source, run_id=run_id, tags={RUN_ID_TAG: run_id}, await_creation_for=0
        )
        version = str(mv.version)
        deadline = time.monotonic() + wait_s
        delay = 0.1
        while str(mv.status) != "READY":
            if str(mv.status) == "FAILED_REGISTRATION":
                raise TrackingError(
                    f"registering version {version} of model {name!r} in {safe_uri} failed: "
                    f"{mv.status_message or 'no reason given'}; check the server log and retry"
                )
            if time.monotonic() > deadline:
                raise TrackingError(
                    f"version {version} of model {name!r} in {safe_uri} is still "
                    f"{mv.status} after {wait_s:g} s; check the server and retry"
                )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            mv = c.get_model_version(name, version)
        if promote:
            c.set_registered_model_alias(name, alias, version)
    return version


_MODELS_PREFIX = "models:"
_URI_SCHEME_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]+):")
_NAME_RE = re.compile(r"^[^/@]+$")


def _usage(uri: str, why: str) -> ModelResolutionError:
    return ModelResolutionError(
        f"bad model URI {uri!r}: {why}; expected models:/NAME@ALIAS, models:/NAME/VERSION "
        "or a local bundle directory"
    )


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` → (name, alias, None); ``models:/NAME/VERSION`` → (name, None, v)."""
    rest = uri[len(_MODELS_PREFIX) :]
    if not rest.startswith("/") or rest.startswith("//"):
        raise _usage(uri, "a registry URI starts with 'models:/' (one slash)")
    rest = rest[1:]
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if not name or not _NAME_RE.match(name):
            raise _usage(uri, "missing or malformed model name before '@'")
        if not alias or "/" in alias:
            raise _usage(uri, "missing or malformed alias after '@'")
        return name, alias, None
    parts = rest.split("/")
    if len(parts) != 2 or not parts[0]:
        raise _usage(uri, "give exactly a model name and a version or alias")
    name, version = parts
    if not version.isdigit() or int(version) < 1:
        if version:
            raise _usage(
                uri, f"version {version!r} is not a positive integer (stages are not supported)"
            )
        raise _usage(uri, "missing version")
    return name, None, str(int(version))


def _resolve_local(uri: str, text: str) -> ResolvedModel:
    if text.startswith("file:"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise _usage(uri, f"file URI with a remote host {parts.netloc!r}")
        text = unquote(parts.path)
    path = Path(os.path.expandvars(os.path.expanduser(text))).absolute()
    if not path.exists():
        raise ModelResolutionError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelResolutionError(f"model path {path} is not a directory (a bundle is one)")
    if not (path / BUNDLE_META_FILE).is_file():
        raise ModelResolutionError(
            f"model directory {path} is not a flowscore bundle: it has no {BUNDLE_META_FILE}"
        )
    return ResolvedModel(uri=uri, name=None, version=None, path=path)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / CACHE_MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cache_ok(path: Path, marker: Mapping[str, Any]) -> bool:
    """A complete cache of this very model version (same source and run)."""
    if not (path / BUNDLE_META_FILE).is_file():
        return False
    found = _read_marker(path)
    return found is not None and all(found.get(k) == marker[k] for k in ("source", "run_id"))


def _list_versions(c: MlflowClient, name: str) -> str:
    try:
        escaped = name.replace("'", "\\'")
        versions = sorted(
            (int(mv.version) for mv in c.search_model_versions(f"name = '{escaped}'")),
        )
    except Exception:  # only decorates an error message
        return ""
    shown = ", ".join(str(v) for v in versions[-20:]) or "none"
    return f" (versions: {shown})"


def _download_version(
    c: MlflowClient, uri: str, name: str, version: str, final: Path, marker: Mapping[str, Any]
) -> None:
    """Download the version's artifacts beside ``final``, then move them there atomically."""
    import mlflow.artifacts

    store = c.tracking_uri
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        download_uri = c.get_model_version_download_uri(name, version)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=download_uri,
                dst_path=str(tmp / "download"),
                tracking_uri=store,
                registry_uri=store,
            )
        )
        if not (local / BUNDLE_META_FILE).is_file():
            raise ModelResolutionError(
                f"{uri}: version {version} of model {name!r} in {redact(store)} is not a "
                f"flowscore bundle ({redact(download_uri)} has no {BUNDLE_META_FILE})"
            )
        (local / CACHE_MARKER_FILE).write_text(json.dumps(dict(marker), indent=1), "utf-8")
        if _cache_ok(final, marker):  # another process finished first: keep theirs
            return
        if final.exists() or final.is_symlink():  # stale or incomplete: move it out of the way
            os.replace(final, tmp / "stale")
        try:
            os.replace(local, final)
        except OSError:
            if not _cache_ok(final, marker):  # lost a race to a complete copy: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(
    uri: str,
    *,
    c: MlflowClient | None = None,
    cache_dir: Path | None = None,
    settings: Settings | None = None,
) -> ResolvedModel:
    """Resolve a model URI to a local bundle directory.

    * ``models:/NAME@ALIAS``: the alias is resolved once, to one version; that version is
      what the result (and every row a run writes with it) carries.
    * ``models:/NAME/VERSION``: that version.
    * a local directory (or ``file://`` URI) containing ``flowscore.json``: used in place;
      ``name`` and ``version`` are ``None``.

    Registry versions are downloaded to ``<root>/<NAME>/<VERSION>`` where ``<root>`` is
    ``cache_dir`` or ``flowscore_home()/"models"`` (NAME and VERSION made safe path
    components). The download goes to a temporary directory beside it and is moved into
    place with ``os.replace``, so a crash never leaves a half-written cache. A cached copy is
    reused when it holds ``flowscore.json`` and its marker file (``.flowscore-cache.json``)
    names the same source and run as the registry's version (so two registries that both
    have a ``NAME/1`` never share a cache entry).

    ``c`` defaults to :func:`client` on :func:`tracking_uri` of ``settings`` (the command's;
    None: read from the environment). Raises
    :class:`ModelResolutionError` for bad syntax, an unknown model, alias or version, or a
    missing directory; :class:`TrackingError` when the store cannot be reached. Imports no
    torch: loading the bundle is the caller's job.
    """
    from mlflow.exceptions import MlflowException

    text = uri.strip()
    if not text:
        raise _usage(uri, "empty")
    if not text.startswith(_MODELS_PREFIX):
        m = _URI_SCHEME_RE.match(text)
        if m and m.group("scheme").lower() != "file":
            raise _usage(uri, f"unsupported scheme {m.group('scheme')!r}")
        return _resolve_local(uri, text)

    name, alias, version = _parse_models_uri(text)
    c = c or client(settings=settings)
    store = c.tracking_uri
    safe_store = redact(store)
    with _talking_to(store, f"resolving {uri}"):
        try:
            rm = c.get_registered_model(name)
        except MlflowException as exc:
            if _error_code(exc) == _DOES_NOT_EXIST:
                raise ModelResolutionError(
                    f"no registered model {name!r} in {safe_store}; train one with "
                    f"`flowscore train --name {name}`"
                ) from None
            raise
        if alias is not None:
            try:
                mv = c.get_model_version_by_alias(name, alias)
            except MlflowException as exc:
                if _error_code(exc) not in (_DOES_NOT_EXIST, _INVALID_VALUE):
                    raise
                have = ", ".join(sorted(str(a) for a in (rm.aliases or {}))) or "none"
                raise ModelResolutionError(
                    f"model {name!r} in {safe_store} has no alias {alias!r} (aliases: {have}); "
                    f"use one of them, pin a version as models:/{name}/N, or promote a "
                    f"version to {alias!r}"
                ) from None
        else:
            assert version is not None
            try:
                mv = c.get_model_version(name, version)
            except MlflowException as exc:
                if _error_code(exc) != _DOES_NOT_EXIST:
                    raise
                raise ModelResolutionError(
                    f"model {name!r} in {safe_store} has no version {version}"
                    f"{_list_versions(c, name)}"
                ) from None
        version = str(mv.version)
        if str(mv.status) != "READY":
            raise ModelResolutionError(
                f"version {version} of model {name!r} in {safe_store} is {mv.status}, not "
                "READY; wait for registration to finish or use another version"
            )
        marker = {
            "name": name,
            "version": version,
            "source": str(mv.source),
            "run_id": str(mv.run_id or ""),
            "tracking_uri": safe_store,
        }
        root = Path(cache_dir) if cache_dir is not None else flowscore_home(settings) / "models"
        final = root.absolute() / _path_segment(name) / _path_segment(version)
        if not _cache_ok(final, marker):
            _download_version(c, uri, name, version, final, marker)
    return ResolvedModel(uri=uri, name=name, version=version, path=final)
