"""Archive I/O: list the images of an archive, read their bytes, decode them robustly.

An *archive* is any tree of images under a local directory (a plain path or a ``file://``
URI) or an S3 prefix (``s3://bucket/prefix``; ``AWS_ENDPOINT_URL`` selects an S3-compatible
store). See "Archive layout" in DESIGN.md. The rules implemented here:

* Images are files whose name ends in one of :data:`IMAGE_EXTENSIONS`, in any case. The file
  extension only selects what is listed; :func:`decode_image` sniffs the content (a PNG
  named ``.jpg`` decodes as a PNG).
* A file is skipped when any component of its path *relative to the archive root* (a
  directory or the file name) starts with ``_`` or ``.`` (ground truth, tool files). The
  components of the root itself are not checked.
* Directory segments ``key=value`` become string columns, in path order. Only keys that look
  like identifiers (``[A-Za-z][A-Za-z0-9_]*``) count, lower-cased (SQL names are
  case-insensitive: ``Camera=1/`` and ``camera=2/`` are one column ``camera``, not two that
  clash in ``query``); a key repeated deeper overrides the shallower value.
* ``image_uri`` is canonical and absolute: ``s3://bucket/key`` or ``file:///abs/path``
  (no percent-encoding, like fsspec). ``etag`` is the S3 ETag without quotes, or locally
  ``f"{size}-{mtime_ns}"``, so rewriting a file changes it.
* All timestamps (``ArchiveEntry.mtime``, ``DecodedImage.exif_datetime``,
  :func:`captured_at`) are **naive datetimes in UTC**. EXIF times carry an offset only when
  the camera wrote ``OffsetTime*``; without one they are taken as UTC, and so are
  timestamps found in file names.

Decoding (:func:`decode_image`) never lets a bad file escape as anything but
:class:`DecodeError`, whose ``stage``/``error_type``/``message`` fill one ``scoring_errors``
row (Promise 1).

S3 (Promise 5): every request is bounded by the ``FLOWSCORE_S3_*`` timeouts and client
retries (:mod:`pipelines.storage`). Reading, opening and listing retry transient failures
(timeouts, connection errors, HTTP 5xx, throttling) with backoff for up to
``FLOWSCORE_S3_RETRY_BUDGET_S``, then raise :class:`StorageUnavailable`: an outage is never
a per-file error. A missing file or a denied access is one (``DecodeError``, stage
``read``). Every mode Pillow opens is converted to 8-bit RGB; see
:func:`decode_image` for the conversion rules (16-bit is scaled by 1/256, alpha is
composited onto black).
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import fsspec
import fsspec.asyn
import numpy as np
from PIL import Image, ImageOps

from . import settings as settings_mod
from .redact import has_userinfo, redact
from .storage import S3FS_RETRIES, StorageUnavailable, retry_transient, s3fs_kwargs

_log = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_FORMATS",
    "IMAGE_EXTENSIONS",
    "ArchiveEntry",
    "ArchiveError",
    "DecodeError",
    "DecodedImage",
    "StorageUnavailable",
    "captured_at",
    "check_archive_uri",
    "decode_image",
    "is_image_path",
    "list_archive",
    "open_archive",
    "parse_columns",
    "read_bytes",
    "timestamp_from_name",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
"""File name endings listed as images (compared case-insensitively)."""

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")
"""Pillow decoders :func:`decode_image` may use; anything else (GIF, PSD, ...) is an error."""

_MESSAGE_LIMIT = 500
_EPOCH = datetime(1970, 1, 1)
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_BYTESIO_RE = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")

# EXIF tags
_EXIF_IFD = 0x8769
_TAG_DATETIME = 306
_TAG_DATETIME_ORIGINAL = 36867
_TAG_OFFSET_TIME = 36880
_TAG_OFFSET_TIME_ORIGINAL = 36881
_TAG_SUBSEC_TIME = 37520
_TAG_SUBSEC_TIME_ORIGINAL = 37521

_EXIF_DT_RE = re.compile(r"^\s*(\d{4})[:\-/](\d{2})[:\-/](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET_RE = re.compile(r"^\s*([+-])(\d{2}):?(\d{2})")
# YYYYmmddTHHMMSS, YYYYmmdd_HHMMSS, YYYY-mm-dd_HH-MM-SS, YYYYmmddHHMMSS, YYYY-mm-ddTHH:MM:SS ...
_NAME_TS_RE = re.compile(
    r"(?<!\d)(?P<Y>(?:19|20)\d{2})(?P<ds>[-_.]?)(?P<m>\d{2})(?P=ds)(?P<d>\d{2})"
    r"[Tt_\- ]?"
    r"(?P<H>\d{2})(?P<ts>[-_.:]?)(?P<M>\d{2})(?P=ts)(?P<S>\d{2})(?!\d)"
)

# Exceptions that mean "this file is bad" (the set Pillow's own fuzzing treats as such).
_BAD_FILE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    MemoryError,
    NotImplementedError,
    OverflowError,
    struct.error,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # only raised when a warnings filter says "error"
)
# Broken EXIF must never fail a decode: it only means "no EXIF date".
_EXIF_ERRORS: tuple[type[BaseException], ...] = (
    *_BAD_FILE_ERRORS,
    KeyError,
    TypeError,
    AttributeError,
)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)

# Per-file read failures that become a scoring_errors row (stage "read"). Transient S3
# failures are retried and end as StorageUnavailable; anything else (credentials, bugs)
# propagates unchanged.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


class ArchiveError(ValueError):
    """The archive URI is unusable: missing, not a directory, unknown scheme, no bucket,
    credentials in the URI. The message is redacted (:func:`pipelines.redact.redact`)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(str(message)))


class DecodeError(Exception):
    """One image could not be read or decoded; maps onto one ``scoring_errors`` row.

    Attributes:
        stage: ``"read"`` (the bytes could not be fetched) or ``"decode"``.
        error_type: the original exception's class name (``"OSError"``,
            ``"UnidentifiedImageError"``, ...) or one of ``"EmptyFile"``, ``"EmptyImage"``,
            ``"DecompressionBombError"``.
        message: human-readable detail, at most 500 characters.
    """

    def __init__(self, stage: str, error_type: str, message: str) -> None:
        self.stage = stage
        self.error_type = error_type
        self.message = _shorten(message)
        super().__init__(f"{stage}: {error_type}: {self.message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*self.args); ours has a different signature (Ray ships
        # exceptions between processes).
        return (type(self), (self.stage, self.error_type, self.message))


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """One image of an archive, as listed (nothing read yet). Slotted, and the files of one
    folder share one ``columns`` dict (do not mutate it): a listing of a million files is
    about 0.4 GB of these, not 0.9 (``flowscore bench --tables``).

    Attributes:
        image_uri: canonical absolute URI (``s3://bucket/key`` or ``file:///abs/path``).
        etag: S3 ETag without quotes, or ``f"{size}-{mtime_ns}"`` for local files.
        size: size in bytes.
        mtime: last modification, naive UTC (``None`` if the store did not say).
        path: path relative to the archive root, with forward slashes.
        columns: ``key=value`` segments of the directory part of ``path``, in order.
    """

    image_uri: str
    etag: str
    size: int
    mtime: datetime | None
    path: str
    columns: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded image: ``rgb`` is H×W×3 ``uint8``, C-contiguous, after EXIF orientation.

    ``exif_datetime`` is EXIF DateTimeOriginal (else DateTime) as naive UTC, or ``None``.
    """

    rgb: np.ndarray
    width: int
    height: int
    exif_datetime: datetime | None


# --------------------------------------------------------------------------------------------
# Filesystems and URIs


def _shorten(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    text = redact(_BYTESIO_RE.sub("<bytes>", text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _s3_filesystem() -> fsspec.AbstractFileSystem:
    """An s3fs filesystem; ``AWS_ENDPOINT_URL`` (if set) selects the endpoint, the
    ``FLOWSCORE_S3_*`` settings its timeouts and retries (:func:`pipelines.storage.s3fs_kwargs`).

    fsspec caches instances by their arguments, so repeated calls share one client.
    """
    import s3fs  # imported lazily: aiobotocore is slow to import

    s = settings_mod.current()  # also in Ray's decode tasks: their own environment
    kwargs: dict[str, Any] = s3fs_kwargs(s.s3)
    if s.s3_endpoint:
        kwargs["client_kwargs"] = {"endpoint_url": s.s3_endpoint}
    fs: fsspec.AbstractFileSystem = s3fs.S3FileSystem(**kwargs)
    # s3fs retries in two nested loops around botocore's own retries (5 x 5 x botocore's by
    # default); botocore's bounded retries and retry_transient's budget are the only ones
    fs.retries = S3FS_RETRIES
    return fs


def _split_uri(uri: str) -> tuple[str, str]:
    """``(scheme, path)``: ``("s3", "bucket/prefix")`` or ``("file", "/abs/path")``."""
    if not isinstance(uri, str) or not uri.strip():
        raise ArchiveError(f"archive URI must be a non-empty string, got {uri!r}")
    uri = uri.strip()
    lowered = uri.lower()
    if lowered.startswith("s3://"):
        path = uri[5:].strip("/")
        if not path:
            raise ArchiveError(f"{uri!r}: S3 URI has no bucket (expected s3://bucket/prefix)")
        bucket = path.split("/", 1)[0]
        if has_userinfo(uri) or "@" in bucket:
            raise ArchiveError(
                f"{redact(uri)!r}: credentials in an S3 URI are refused; give them through "
                "the AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a role)"
            )
        if ":" in bucket:
            raise ArchiveError(f"{uri!r}: {bucket!r} is not an S3 bucket name")
        return "s3", path
    if lowered.startswith("file://"):
        rest = uri[7:]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise ArchiveError(f"{uri!r}: file URIs must be absolute (file:///abs/path)")
        return "file", os.path.abspath(rest)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", uri):
        scheme = uri.split("://", 1)[0]
        raise ArchiveError(f"{uri!r}: unsupported scheme {scheme!r} (use a path or s3://)")
    return "file", os.path.abspath(os.path.expanduser(uri))


def _local_uri(abs_path: str) -> str:
    return "file://" + abs_path.replace(os.sep, "/")


def check_archive_uri(uri: str) -> None:
    """Check the form of an archive URI without touching the archive (a scheme flowscore
    reads, a bucket, no credentials in it). Raises :class:`ArchiveError`."""
    _split_uri(uri)


def open_archive(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Open an archive root and check that it exists and is a directory.

    Args:
        uri: a local path, a ``file://`` URI, or ``s3://bucket[/prefix]``.

    Returns:
        ``(fs, root)`` where ``root`` is the path inside ``fs`` (``/abs/dir`` locally,
        ``bucket/prefix`` on S3, no trailing slash).

    Raises:
        ArchiveError: the path does not exist, is not a directory, the bucket is missing or
            denied, or the scheme is not supported. The message names the URI.
        StorageUnavailable: S3 kept failing for longer than the retry budget.
    """
    scheme, path = _split_uri(uri)
    if scheme == "file":
        fs = fsspec.filesystem("file")
        if not os.path.exists(path):
            raise ArchiveError(f"archive {uri!r} does not exist (looked for {path})")
        if not os.path.isdir(path):
            raise ArchiveError(f"archive {uri!r} is not a directory ({path})")
        return fs, path
    fs = _s3_filesystem()
    bucket = path.split("/", 1)[0]

    def check() -> None:
        fs.invalidate_cache(path)
        try:
            # not fs.exists(bucket): that answers False for any error, an outage included
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise ArchiveError(f"archive {uri!r}: bucket {bucket!r} does not exist") from None
        except PermissionError as e:
            raise ArchiveError(f"archive {uri!r}: access to bucket {bucket!r} denied: {e}") from e
        if path != bucket:
            if fs.isfile(path):
                raise ArchiveError(f"archive {uri!r} is an object, not a prefix (directory)")
            if not fs.isdir(path):
                raise ArchiveError(f"archive {uri!r} does not exist (no objects under the prefix)")

    retry_transient(check, "open the archive", uri)
    return fs, path


def read_bytes(uri: str) -> bytes:
    """Read a whole file given by an ``image_uri`` (or any path/``file://``/``s3://`` URI).

    S3 reads are retried on transient failures (timeouts, connection errors, HTTP 5xx,
    throttling) with exponential backoff for up to ``FLOWSCORE_S3_RETRY_BUDGET_S``
    (:func:`pipelines.storage.retry_transient`).

    Raises:
        DecodeError: ``stage="read"`` when the file itself is unreadable: missing (e.g.
            deleted since listing), a directory, or access denied.
        StorageUnavailable: S3 kept failing for longer than the retry budget (an outage,
            not a bad file: the caller must end the run, not write an error row).
        Exception: other failures (credentials, bugs) propagate unchanged.
    """
    try:
        scheme, path = _split_uri(uri)
    except ArchiveError as e:
        raise DecodeError("read", "ArchiveError", str(e)) from e
    try:
        if scheme == "file":
            with open(path, "rb") as f:
                return f.read()
        fs = _s3_filesystem()
        # one GET (max_concurrency=1 skips the HEAD that s3fs sends to split large files)
        data = retry_transient(lambda: fs.cat_file(path, max_concurrency=1), "read", uri)
        return bytes(data)
    except _READ_ERRORS as e:
        raise DecodeError("read", type(e).__name__, f"{uri}: {e}") from e


# --------------------------------------------------------------------------------------------
# Listing


def is_image_path(path: str) -> bool:
    """True for a relative path an archive lists as an image (extension, no ``_``/``.``)."""
    parts = path.split("/")
    if any(not p or p[0] in "_." for p in parts):
        return False
    return parts[-1].lower().endswith(IMAGE_EXTENSIONS)


def shared_columns() -> Callable[[str], dict[str, str]]:
    """:func:`parse_columns` with one dict per directory, shared by the files in it (a
    listing of millions of files then holds one small dict per folder, not one per file)."""
    cache: dict[str, dict[str, str]] = {}

    def columns(path: str) -> dict[str, str]:
        folder = path.rpartition("/")[0]
        got = cache.get(folder)
        if got is None:
            got = cache[folder] = parse_columns(path)
        return got

    return columns


def parse_columns(path: str) -> dict[str, str]:
    """The ``key=value`` directory segments of a relative path (the file name is ignored),
    keys lower-cased."""
    columns: dict[str, str] = {}
    for segment in path.split("/")[:-1]:
        key, sep, value = segment.partition("=")
        if sep and _KEY_RE.fullmatch(key):
            columns[key.lower()] = value
    return columns


def _from_epoch_ns(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


def _epoch_ns(value: datetime) -> int:
    """Nanoseconds since the epoch of a naive UTC time (microsecond precision)."""
    d = value - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000_000 + d.microseconds * 1000


def _naive_utc(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value
    if isinstance(value, int | float):
        return _from_epoch_ns(int(value * 1e9))
    return None


FOLLOW_LINKS_ENV = settings_mod.FOLLOW_LINKS_ENV


def follow_links_outside(settings: settings_mod.Settings | None = None) -> bool:
    """Whether symbolic links that lead out of a local archive's root are followed
    (``FLOWSCORE_FOLLOW_SYMLINKS=1``; default: skipped)."""
    return (settings or settings_mod.current()).follow_links


def _inside(path: str, real_root: str) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _walk_local(root: str, *, follow_outside: bool = False) -> Iterator[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` for every candidate image under ``root``.

    Prunes ``_``/``.`` directories without entering them. Symlinked directories are
    followed, each real directory at most once (no cycles); broken links are skipped. A
    link (to a file or a directory) whose target lies outside ``root`` is skipped, with one
    warning per listing, unless ``follow_outside``: an archive is what is under its root.
    """
    real_root = os.path.realpath(root)
    outside = 0
    root_stat = os.stat(root)
    seen: set[tuple[int, int]] = {(root_stat.st_dev, root_stat.st_ino)}
    stack: list[tuple[str, str]] = [(root, "")]
    while stack:
        directory, rel_dir = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # vanished or unreadable while walking
        for entry in entries:
            name = entry.name
            if name[:1] in ("_", "."):
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                st = entry.stat()  # follows symlinks
            except OSError:
                continue  # broken link or vanished
            if not follow_outside and entry.is_symlink() and not _inside(entry.path, real_root):
                outside += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    stack.append((entry.path, rel))
            elif stat.S_ISREG(st.st_mode) and name.lower().endswith(IMAGE_EXTENSIONS):
                yield rel, st.st_size, st.st_mtime_ns
    if outside:
        _log.warning(
            "skipped %d symbolic link(s) under %s that lead outside it (%s=1 follows them)",
            outside,
            root,
            FOLLOW_LINKS_ENV,
        )


class ArchiveListing(Sequence[ArchiveEntry]):
    """An archive's listing held in columns, sorted by relative path: about 100 bytes a
    file instead of a Python object each (455 bytes), so a nightly job over millions of
    files keeps the listing in memory cheaply (``flowscore bench --tables``). Entries are
    made on access (``listing[i]``, iteration); :meth:`keys` gives ``(image_uri, etag)``
    pairs without making them.

    ``image_uri`` is ``prefix + path``; a local file's etag is ``f"{size}-{mtime_ns}"`` (no
    column), an S3 object's its ETag (a column)."""

    _CHUNK = 65_536

    def __init__(
        self,
        prefix: str,
        paths: Any,  # pa.StringArray / LargeStringArray, sorted
        sizes: np.ndarray,
        mtimes_ns: np.ndarray,  # int64; _NO_TIME where the store did not say
        etags: Any | None,  # pa string array, or None: local "{size}-{mtime_ns}"
    ) -> None:
        self.prefix = prefix
        self.paths = paths
        self.sizes = sizes
        self.mtimes_ns = mtimes_ns
        self.etags = etags
        self._columns = shared_columns()

    def __len__(self) -> int:
        return len(self.paths)

    def _etag(self, i: int, path_etags: Any) -> str:
        if self.etags is None:
            return f"{int(self.sizes[i])}-{int(self.mtimes_ns[i])}"
        return str(path_etags)

    def _entry(self, i: int, path: str, etag: str) -> ArchiveEntry:
        ns = int(self.mtimes_ns[i])
        return ArchiveEntry(
            image_uri=self.prefix + path,
            etag=etag,
            size=int(self.sizes[i]),
            mtime=None if ns == _NO_TIME else _from_epoch_ns(ns),
            path=path,
            columns=self._columns(path),
        )

    def _chunks(self) -> Iterator[tuple[int, list[str], list[str]]]:
        """``(first index, paths, etags)`` of successive chunks."""
        for k in range(0, len(self), self._CHUNK):
            paths = self.paths.slice(k, self._CHUNK).to_pylist()
            if self.etags is None:
                sizes = self.sizes[k : k + len(paths)].tolist()
                times = self.mtimes_ns[k : k + len(paths)].tolist()
                etags = [f"{a}-{b}" for a, b in zip(sizes, times, strict=True)]
            else:
                etags = self.etags.slice(k, self._CHUNK).to_pylist()
            yield k, paths, etags

    def keys(self) -> Iterator[tuple[str, str]]:
        """``(image_uri, etag)`` of every file, in order, without making entries."""
        prefix = self.prefix
        for _, paths, etags in self._chunks():
            for p, e in zip(paths, etags, strict=True):
                yield prefix + p, e

    def __iter__(self) -> Iterator[ArchiveEntry]:
        for k, paths, etags in self._chunks():
            for j, (p, e) in enumerate(zip(paths, etags, strict=True)):
                yield self._entry(k + j, p, e)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        path = self.paths[i].as_py()
        etag = self._etag(i, None if self.etags is None else self.etags[i].as_py())
        return self._entry(i, path, etag)

    def path_columns(self) -> list[str]:
        """The ``key=value`` column names of every folder in the listing, sorted."""
        import pyarrow.compute as pc

        folders = pc.unique(pc.replace_substring_regex(self.paths, r"/[^/]*$", "/x"))
        return sorted({k for f in folders.to_pylist() for k in parse_columns(f)})


_NO_TIME = np.iinfo(np.int64).min


class ListingBuilder:
    """Collects ``(path, size, mtime_ns, etag)`` in chunks of plain lists turned into
    Arrow and NumPy arrays, then sorts once: the listing's peak is about twice its final
    size, never a Python tuple per file."""

    CHUNK = 100_000

    def __init__(self, prefix: str, with_etags: bool) -> None:
        self.prefix, self.with_etags = prefix, with_etags
        self._parts: list[tuple[Any, np.ndarray, np.ndarray, Any]] = []
        self._rows: tuple[list[str], list[int], list[int], list[str]] = ([], [], [], [])

    def add(self, path: str, size: int, mtime_ns: int | None, etag: str = "") -> None:
        paths, sizes, times, etags = self._rows
        paths.append(path)
        sizes.append(size)
        times.append(_NO_TIME if mtime_ns is None else mtime_ns)
        if self.with_etags:
            etags.append(etag)
        if len(paths) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        paths, sizes, times, etags = self._rows
        if paths:
            self._parts.append(
                (
                    pa.array(paths, pa.string()),
                    np.asarray(sizes, np.int64),
                    np.asarray(times, np.int64),
                    pa.array(etags, pa.string()) if self.with_etags else None,
                )
            )
        self._rows = ([], [], [], [])

    def build(self) -> ArchiveListing:
        import pyarrow as pa
        import pyarrow.compute as pc

        self._flush()
        parts, self._parts = self._parts, []
        paths = pa.chunked_array([p[0] for p in parts], pa.string()).combine_chunks()
        sizes = np.concatenate([p[1] for p in parts] or [np.empty(0, np.int64)])
        times = np.concatenate([p[2] for p in parts] or [np.empty(0, np.int64)])
        etags = None
        if self.with_etags:
            etags = pa.chunked_array([p[3] for p in parts], pa.string()).combine_chunks()
        del parts
        order = pc.sort_indices(paths)
        if len(order) and not pc.all(pc.equal(order, pa.array(np.arange(len(order))))).as_py():
            idx = order.to_numpy()
            paths, sizes, times = paths.take(order), sizes[idx], times[idx]
            etags = etags.take(order) if etags is not None else None
        pa.default_memory_pool().release_unused()  # the unsorted chunks, gone now
        return ArchiveListing(self.prefix, paths, sizes, times, etags)


def list_archive_columns(uri: str) -> ArchiveListing:
    """The images of an archive as an :class:`ArchiveListing`, sorted by relative path.

    Local trees are walked with ``os.scandir`` (pruning skipped directories, nanosecond
    mtimes for the etag); S3 prefixes are listed page by page (fresh, not from s3fs's
    listing cache), each page's objects going straight into the columns.

    Raises:
        ArchiveError: as :func:`open_archive`.
        StorageUnavailable: S3 kept failing for longer than the retry budget.
    """
    fs, root = open_archive(uri)
    scheme, _ = _split_uri(uri)
    if scheme == "file":
        builder = ListingBuilder(_local_uri(root) + "/", with_etags=False)
        for rel, size, mtime_ns in _walk_local(root, follow_outside=follow_links_outside()):
            builder.add(rel, size, mtime_ns)
        return builder.build()

    prefix = root + "/"
    bucket, _, key = root.partition("/")

    def listing() -> ArchiveListing:
        builder = ListingBuilder(f"s3://{prefix}", with_etags=True)

        async def pages() -> None:
            async for info in fs._iterdir(bucket, delimiter="", prefix=f"{key}/" if key else ""):
                name = str(info.get("name", "")).strip("/")
                if info.get("type", "file") != "file" or not name.startswith(prefix):
                    continue
                rel = name[len(prefix) :]
                if not is_image_path(rel):
                    continue
                etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
                mtime = _naive_utc(info.get("LastModified") or info.get("mtime"))
                ns = None if mtime is None else _epoch_ns(mtime)
                builder.add(rel, int(info.get("size") or 0), ns, etag)

        try:
            fsspec.asyn.sync(fs.loop, pages)
        except Exception as e:  # as s3fs's own listing calls raise them
            from botocore.exceptions import ClientError
            from s3fs.errors import translate_boto_error

            if isinstance(e, ClientError):
                raise translate_boto_error(e) from e
            raise
        return builder.build()

    return retry_transient(listing, "list the archive", uri)


def list_archive(uri: str) -> Iterator[ArchiveEntry]:
    """Yield the images of an archive as :class:`ArchiveEntry`, sorted by relative path
    (:func:`list_archive_columns`, one entry at a time).

    Raises:
        ArchiveError: as :func:`open_archive`.
        StorageUnavailable: S3 kept failing for longer than the retry budget.
    """
    yield from list_archive_columns(uri)


# --------------------------------------------------------------------------------------------
# Timestamps


def _exif_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, tuple | list) and value:
        value = value[0]
    if not isinstance(value, str):
        return None
    return value.replace("\x00", "").strip()


def _parse_exif_datetime(value: Any, offset: Any = None, subsec: Any = None) -> datetime | None:
    """EXIF ``YYYY:MM:DD HH:MM:SS`` (+ optional offset and sub-seconds) → naive UTC."""
    text = _exif_text(value)
    if not text:
        return None
    m = _EXIF_DT_RE.match(text)
    if not m:
        return None
    try:
        year, month, day, hour, minute, second = (int(g) for g in m.groups())
        dt = datetime(year, month, day, hour, minute, second)
    except ValueError:  # 0000:00:00 00:00:00 and other placeholders
        return None
    sub = _exif_text(subsec)
    if sub and sub.isdigit():
        dt = dt.replace(microsecond=int(sub[:6].ljust(6, "0")))
    off = _exif_text(offset)
    om = _OFFSET_RE.match(off) if off else None
    if om:
        delta = timedelta(hours=int(om.group(2)), minutes=int(om.group(3)))
        dt = dt - delta if om.group(1) == "+" else dt + delta
    return dt


def _exif_datetime(im: Image.Image) -> datetime | None:
    """DateTimeOriginal from the Exif IFD, else DateTime; ``None`` if absent or unreadable."""
    try:
        exif = im.getexif()
        sub_ifd = exif.get_ifd(_EXIF_IFD)
        found = _parse_exif_datetime(
            sub_ifd.get(_TAG_DATETIME_ORIGINAL),
            sub_ifd.get(_TAG_OFFSET_TIME_ORIGINAL),
            sub_ifd.get(_TAG_SUBSEC_TIME_ORIGINAL),
        )
        if found is None:
            found = _parse_exif_datetime(
                exif.get(_TAG_DATETIME),
                sub_ifd.get(_TAG_OFFSET_TIME),
                sub_ifd.get(_TAG_SUBSEC_TIME),
            )
        return found
    except _EXIF_ERRORS:
        return None


def timestamp_from_name(path: str) -> datetime | None:
    """A timestamp in the file name (not the directories), as naive UTC, or ``None``.

    Recognises ``YYYYmmddTHHMMSS``, ``YYYYmmdd_HHMMSS``, ``YYYY-mm-dd_HH-MM-SS``,
    ``YYYYmmddHHMMSS`` and similar (date separators ``-_.``, time separators ``-_.:``,
    date/time separator ``T``, ``_``, ``-``, space or none), years 1900-2099, not embedded
    in a longer run of digits. The first valid match wins; a zone suffix is ignored.
    """
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    for m in _NAME_TS_RE.finditer(name):
        try:
            return datetime(
                int(m["Y"]), int(m["m"]), int(m["d"]), int(m["H"]), int(m["M"]), int(m["S"])
            )
        except ValueError:
            continue
    return None


def captured_at(
    data_or_image: bytes | Image.Image | DecodedImage | None,
    path: str,
    fallback: datetime | None,
) -> datetime | None:
    """When the image was taken, as naive UTC.

    Precedence: EXIF DateTimeOriginal (else EXIF DateTime) from ``data_or_image`` (raw
    bytes, an open Pillow image, or a :class:`DecodedImage`), then a timestamp in the file
    name of ``path`` (:func:`timestamp_from_name`), then ``fallback`` (normally the file's
    modification time). Unreadable bytes simply have no EXIF; this never raises for them.
    """
    found: datetime | None = None
    if isinstance(data_or_image, DecodedImage):
        found = data_or_image.exif_datetime
    elif isinstance(data_or_image, Image.Image):
        found = _exif_datetime(data_or_image)
    elif isinstance(data_or_image, bytes | bytearray | memoryview) and len(data_or_image):
        try:
            with Image.open(io.BytesIO(bytes(data_or_image)), formats=ALLOWED_FORMATS) as im:
                found = _exif_datetime(im)
        except _BAD_FILE_ERRORS:
            found = None
    if found is not None:
        return found
    from_name = timestamp_from_name(path)
    if from_name is not None:
        return from_name
    return _naive_utc(fallback) if fallback is not None else None


# --------------------------------------------------------------------------------------------
# Decoding

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to an H×W×3 uint8 array (rules in :func:`decode_image`)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray16 = np.asarray(im).astype(np.uint16, copy=False)
        return _gray_to_rgb((gray16 >> 8).astype(np.uint8))
    if mode.startswith("I;16") or mode == "I":  # signed 16-bit or 32-bit integer
        wide = np.asarray(im).astype(np.int64)
        return _gray_to_rgb((np.clip(wide, 0, 65535) >> 8).astype(np.uint8))
    if mode == "F":
        f = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        return _gray_to_rgb(np.rint(np.clip(f, 0.0, 255.0)).astype(np.uint8))
    if mode in _ALPHA_MODES or im.has_transparency_data:
        rgba = np.asarray(im.convert("RGBA"))
        alpha = rgba[:, :, 3:4].astype(np.uint16)
        # composite onto black: round(c * a / 255)
        return ((rgba[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    if mode == "L":
        return _gray_to_rgb(np.asarray(im))
    if mode != "RGB":
        im = im.convert("RGB")  # 1, P, CMYK, YCbCr, LAB, HSV, RGBX, ...
    return np.asarray(im)


def _decode(data: bytes, max_pixels: int) -> DecodedImage:
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise DecodeError(
                "decode",
                "DecompressionBombError",
                f"image is {width}x{height} = {width * height} pixels, "
                f"more than max_pixels={max_pixels}",
            )
        if width <= 0 or height <= 0:
            raise DecodeError("decode", "EmptyImage", f"image has size {width}x{height}")
        im.load()  # decodes the first frame; truncated data raises OSError here
        exif_dt = _exif_datetime(im)  # after load: a PNG's eXIf chunk may follow the pixels
        ImageOps.exif_transpose(im, in_place=True)
        rgb = _to_rgb(im)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"conversion of mode {im.mode!r} gave {rgb.dtype} {rgb.shape}")
    if not (rgb.flags.c_contiguous and rgb.flags.writeable):
        rgb = np.array(rgb, dtype=np.uint8, order="C")
    return DecodedImage(
        rgb=rgb, width=int(rgb.shape[1]), height=int(rgb.shape[0]), exif_datetime=exif_dt
    )


def decode_image(data: bytes, *, max_pixels: int = 100_000_000) -> DecodedImage:
    """Decode image bytes into 8-bit RGB, or raise :class:`DecodeError` (``stage="decode"``).

    * Formats: only JPEG, PNG, TIFF, BMP and WEBP decoders are tried (content sniffing, not
      the file extension). Multi-frame files give their first frame.
    * Size guard: more than ``max_pixels`` pixels (width × height from the header, checked
      before any pixel is decoded) → ``error_type="DecompressionBombError"``. Pillow's own
      process-wide guard (``Image.MAX_IMAGE_PIXELS``; error above twice it) still applies
      and is reported the same way; its *warning* (between once and twice the limit) is
      left alone, because ``max_pixels`` decides. Nothing global is mutated, so this is
      safe to call from many threads.
    * Zero bytes → ``error_type="EmptyFile"``. Truncated data fails (this never sets
      ``ImageFile.LOAD_TRUNCATED_IMAGES``; a process that sets it globally gets Pillow's
      lenient behaviour).
    * EXIF orientation is applied (``ImageOps.exif_transpose``); ``width``/``height`` are
      those of the result.
    * Mode conversion to RGB:
        - ``RGB`` as is; ``L`` replicated to three channels; ``1`` gives 0/255.
        - 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): ``value >> 8`` (scaled,
          not clipped, so 65535 → 255 and 1000 → 3). ``I`` (32-bit, also signed 16-bit
          TIFFs) is taken on the same 0..65535 scale: clipped to it, then ``>> 8``.
        - ``F`` (float) follows Pillow's convention of a 0..255 scale: clipped, rounded,
          NaN → 0.
        - 48-bit RGB / 64-bit RGBA PNGs are opened by Pillow as 8-bit ``RGB``/``RGBA``
          (it keeps the high byte), which is the same ``>> 8`` rule.
        - Alpha (``RGBA``, ``LA``, ``PA``, premultiplied modes, and palette/grey/RGB images
          with a ``tRNS`` transparency key) is **composited onto black**:
          ``round(c * a / 255)``; fully transparent pixels become (0, 0, 0).
        - ``P`` (palette), ``CMYK`` (Pillow's naive conversion, no ICC profile), ``YCbCr``,
          ``HSV``, ``LAB`` and the rest: ``Image.convert("RGB")``.
    * Any of OSError (incl. ``UnidentifiedImageError``), SyntaxError, ValueError,
      MemoryError, NotImplementedError, OverflowError, struct.error, EOFError and Pillow's
      decompression-bomb error become ``DecodeError(stage="decode", error_type=<class
      name>)``. Other exceptions (bugs) propagate.

    Returns:
        :class:`DecodedImage` with a C-contiguous, writable ``uint8`` array of H×W×3.
    """
    if not data:
        raise DecodeError("decode", "EmptyFile", "file is empty (0 bytes)")
    try:
        return _decode(bytes(data), max_pixels)
    except DecodeError:
        raise
    except _BOMB_ERRORS as e:
        raise DecodeError("decode", "DecompressionBombError", str(e)) from e
    except _BAD_FILE_ERRORS as e:
        raise DecodeError("decode", type(e).__name__, str(e) or repr(e)) from e
