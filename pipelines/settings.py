"""Everything flowscore takes from its environment, read and checked in one place.

:class:`Settings` holds the home directory, the catalog, the warehouse, the MLflow store, the
S3 endpoint, region, timeouts and retries, the object-store buffer, the largest file read,
the job lock's lease and the Ray address. :meth:`Settings.from_env` builds it from a mapping
of environment variables (``os.environ`` by default) and checks every value: a number that
is not finite or out of range is one clear error naming the variable (exit code 2), never a
traceback and never silently 0 or negative.

``flowscore`` (``jobs/cli.py``) builds it once per command, before anything runs, so a bad
variable stops the command at once, and hands it down; the helpers below ``jobs/`` that
take a ``settings`` argument use the one they are given, and read the environment through
:func:`current` only when called without one (library use, tests). Ray workers get the
variables themselves (``pipelines.raycluster`` passes them) and read them with
:func:`current` in their own process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

__all__ = [
    "SettingError",
    "S3Settings",
    "Settings",
    "current",
    "scratch_env",
    "STORE_ENV",
    "env_number",
    "HOME_ENV",
    "CATALOG_URI_ENV",
    "WAREHOUSE_ENV",
    "MLFLOW_URI_ENV",
    "LOCK_LEASE_ENV",
    "STREAM_BUFFER_ENV",
    "MAX_FILE_ENV",
    "FOLLOW_LINKS_ENV",
    "CONNECT_TIMEOUT_ENV",
    "READ_TIMEOUT_ENV",
    "RETRIES_ENV",
    "RETRY_BUDGET_ENV",
]

HOME_ENV = "FLOWSCORE_HOME"
CATALOG_URI_ENV = "FLOWSCORE_CATALOG_URI"
WAREHOUSE_ENV = "FLOWSCORE_WAREHOUSE"
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
LOCK_LEASE_ENV = "FLOWSCORE_LOCK_LEASE_S"
STREAM_BUFFER_ENV = "FLOWSCORE_STREAM_BUFFER_MB"
MAX_FILE_ENV = "FLOWSCORE_MAX_FILE_MB"
FOLLOW_LINKS_ENV = "FLOWSCORE_FOLLOW_SYMLINKS"
CONNECT_TIMEOUT_ENV = "FLOWSCORE_S3_CONNECT_TIMEOUT_S"
READ_TIMEOUT_ENV = "FLOWSCORE_S3_READ_TIMEOUT_S"
RETRIES_ENV = "FLOWSCORE_S3_RETRIES"
RETRY_BUDGET_ENV = "FLOWSCORE_S3_RETRY_BUDGET_S"

DEFAULT_LOCK_LEASE_S = 120.0
DEFAULT_STREAM_BUFFER_MB = 256.0
DEFAULT_MAX_FILE_MB = 256.0


class SettingError(ValueError):
    """A ``FLOWSCORE_*`` variable has a bad value (exit code 2)."""


def env_number(
    name: str,
    default: float,
    *,
    minimum: float,
    integer: bool = False,
    above: bool = False,
    error: type[SettingError] = SettingError,
    env: Mapping[str, str] | None = None,
) -> float:
    """``name``'s value in ``env`` (default ``os.environ``), or ``default`` when unset or
    blank. It must be a finite number (an integer if ``integer``) ``>= minimum`` (``>
    minimum`` if ``above``); else ``error``."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value: float | None = int(raw) if integer else float(raw)
    except ValueError:
        value = None
    ok = value is not None and math.isfinite(value)
    ok = ok and (value > minimum if above else value >= minimum)  # type: ignore[operator]
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f"> {minimum:g}" if above else f">= {minimum:g}"
        raise error(f"{name} must be {kind} {bound}, got {raw!r}")
    assert value is not None
    return value


@dataclass(frozen=True)
class S3Settings:
    """S3 client limits (``FLOWSCORE_S3_*``; see :mod:`pipelines.storage`)."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    retries: int = 3
    retry_budget_s: float = 120.0

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, error: type[SettingError] = SettingError
    ) -> S3Settings:
        d = cls()

        def number(name: str, default: float, *, integer: bool, minimum: float) -> float:
            return env_number(name, default, minimum=minimum, integer=integer, error=error, env=env)

        return cls(
            connect_timeout_s=number(
                CONNECT_TIMEOUT_ENV, d.connect_timeout_s, integer=False, minimum=0.1
            ),
            read_timeout_s=number(READ_TIMEOUT_ENV, d.read_timeout_s, integer=False, minimum=0.1),
            retries=int(number(RETRIES_ENV, d.retries, integer=True, minimum=0)),
            retry_budget_s=number(RETRY_BUDGET_ENV, d.retry_budget_s, integer=False, minimum=0),
        )


MLFLOW_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
MLFLOW_TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
MLFLOW_BACKOFF_FACTOR_ENV = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
MLFLOW_BACKOFF_JITTER_ENV = "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"


@dataclass(frozen=True)
class MlflowHttp:
    """MLflow's HTTP client limits, MLflow's own ``MLFLOW_HTTP_REQUEST_*`` variables. MLflow's
    defaults (7 retries with exponential backoff, 120 s timeout) make a dead tracking server
    hang a run for minutes; flowscore's (2 retries, 10 s) fail a refused connection in about
    5 s and a server that never answers in at most ``pipelines.tracking.http_request_budget_s``
    = 3 × 10 s + 5 s. Backoff factor and jitter are MLflow's defaults, left alone."""

    max_retries: int = 2
    timeout_s: int = 10
    backoff_factor: float = 2.0
    backoff_jitter: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MlflowHttp:
        d = cls()

        def number(name: str, default: float, minimum: float, integer: bool) -> float:
            return env_number(name, default, minimum=minimum, integer=integer, env=env)

        return cls(
            max_retries=int(number(MLFLOW_RETRIES_ENV, d.max_retries, 0, True)),
            timeout_s=int(number(MLFLOW_TIMEOUT_ENV, d.timeout_s, 1, True)),
            backoff_factor=number(MLFLOW_BACKOFF_FACTOR_ENV, d.backoff_factor, 0, False),
            backoff_jitter=number(MLFLOW_BACKOFF_JITTER_ENV, d.backoff_jitter, 0, False),
        )

    def env(self) -> dict[str, str]:
        """The variables MLflow reads on every request (the CLI puts them into its process's
        environment, the one place MLflow takes them from)."""
        return {MLFLOW_RETRIES_ENV: str(self.max_retries), MLFLOW_TIMEOUT_ENV: str(self.timeout_s)}


def normalize_warehouse(raw: str) -> str:
    """A warehouse location as a URI: plain (relative or ``~``) paths become ``file://``."""
    parsed = urlparse(raw)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, not a scheme
        return raw
    path = os.path.abspath(os.path.expanduser(os.path.expandvars(raw)))
    return f"file://{path}"


@dataclass(frozen=True)
class Settings:
    """What flowscore takes from its environment (module docstring). Build it with
    :meth:`from_env`; every field is checked there."""

    home: Path
    """``$FLOWSCORE_HOME`` or ``~/.flowscore``, absolute (created when first used)."""
    catalog_uri: str
    """``$FLOWSCORE_CATALOG_URI``, else the SQLite catalog under ``home``."""
    warehouse: str
    """``$FLOWSCORE_WAREHOUSE`` as a URI, else ``file://`` ``home``/warehouse."""
    mlflow_uri: str
    """``$MLFLOW_TRACKING_URI``, else the SQLite store under ``home``."""
    s3_endpoint: str | None = None
    """``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL`` (S3-compatible stores)."""
    s3_region: str | None = None
    """``$AWS_REGION`` or ``$AWS_DEFAULT_REGION``."""
    s3: S3Settings = field(default_factory=S3Settings)
    lock_lease_s: float = DEFAULT_LOCK_LEASE_S
    stream_buffer_bytes: int = int(DEFAULT_STREAM_BUFFER_MB * 2**20)
    max_file_bytes: int = int(DEFAULT_MAX_FILE_MB * 2**20)
    follow_links: bool = False
    ray_address: str | None = None
    """``--ray-address``, else ``$RAY_ADDRESS``; None: a local Ray."""
    mlflow_http: MlflowHttp = field(default_factory=MlflowHttp)
    """MLflow's HTTP limits (:class:`MlflowHttp`)."""
    maintain_fault: str = ""
    """``$FLOWSCORE_FAULT_MAINTAIN``: a test hook, the point of maintenance at which the
    process kills itself (``pipelines.usecases.maintain``); empty in real use."""

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, ray_address: str | None = None
    ) -> Settings:
        """Read and check every setting from ``env`` (default ``os.environ``); ``ray_address``
        (a command's flag) wins over ``$RAY_ADDRESS``. Raises :class:`SettingError`, one
        line naming the variable, for a bad value."""
        env = os.environ if env is None else env

        def text(*names: str) -> str | None:
            for name in names:
                value = env.get(name, "").strip()
                if value:
                    return value
            return None

        raw_home = text(HOME_ENV) or "~/.flowscore"
        home = Path(os.path.expandvars(os.path.expanduser(raw_home))).absolute()
        warehouse = text(WAREHOUSE_ENV)
        return cls(
            home=home,
            catalog_uri=text(CATALOG_URI_ENV) or f"sqlite:///{home}/catalog.db",
            warehouse=normalize_warehouse(warehouse) if warehouse else f"file://{home}/warehouse",
            mlflow_uri=text(MLFLOW_URI_ENV) or f"sqlite:///{(home / 'mlflow.db').as_posix()}",
            s3_endpoint=text("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            s3_region=text("AWS_REGION", "AWS_DEFAULT_REGION"),
            s3=S3Settings.from_env(env),
            lock_lease_s=env_number(
                LOCK_LEASE_ENV, DEFAULT_LOCK_LEASE_S, minimum=0, above=True, env=env
            ),
            stream_buffer_bytes=int(
                env_number(
                    STREAM_BUFFER_ENV, DEFAULT_STREAM_BUFFER_MB, minimum=0, above=True, env=env
                )
                * 2**20
            ),
            max_file_bytes=int(
                env_number(MAX_FILE_ENV, DEFAULT_MAX_FILE_MB, minimum=0, above=True, env=env)
                * 2**20
            ),
            follow_links=(text(FOLLOW_LINKS_ENV) or "").lower() in ("1", "true", "yes"),
            ray_address=ray_address or text("RAY_ADDRESS"),
            mlflow_http=MlflowHttp.from_env(env),
            maintain_fault=text("FLOWSCORE_FAULT_MAINTAIN") or "",
        )

    def scratch(self, home: Path) -> Settings:
        """These settings with every store under ``home``: its own catalog, warehouse and
        MLflow store, as an unset environment would give (a bench's throw-away space; never
        the user's tables or registry)."""
        fresh = Settings.from_env({HOME_ENV: str(home)})
        return replace(
            self,
            home=fresh.home,
            catalog_uri=fresh.catalog_uri,
            warehouse=fresh.warehouse,
            mlflow_uri=fresh.mlflow_uri,
        )


#: the variables that point a process at a catalog, warehouse or MLflow store of its own
STORE_ENV = (CATALOG_URI_ENV, WAREHOUSE_ENV, MLFLOW_URI_ENV)


def scratch_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a child process whose stores all live under ``home``
    (``FLOWSCORE_HOME``; the store variables dropped) and that starts a Ray of its own
    (``RAY_ADDRESS`` dropped), plus ``extra``: how a bench runs a job in a throw-away space."""
    env = {k: v for k, v in os.environ.items() if k not in (*STORE_ENV, "RAY_ADDRESS")}
    env.update({HOME_ENV: str(home)}, **extra)
    return env


def current() -> Settings:
    """:meth:`Settings.from_env` of this process's environment: for code called without the
    command's ``settings`` (a library caller, a test, a Ray worker)."""
    return Settings.from_env()
