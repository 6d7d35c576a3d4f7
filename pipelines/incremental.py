"""What a nightly run has left to do: the archive's listing minus what the tables hold.

A file is done, for one model version, when ``image_scores`` has its ``(image_uri, etag)``
under that version, or ``scoring_errors`` has it under that version with a permanent error
(decode or score: the same bytes would fail the same way). A read error (``retryable``) is
tried again; a replaced file has a new etag and is scored again.

The subtraction must stay cheap when the tables hold millions of rows: the done keys are
streamed file by file (:func:`pipelines.tables.done_key_batches`) and each kept as a 16-byte
BLAKE2b digest of ``image_uri NUL etag`` in one sorted NumPy array, 16 bytes per row instead
of two Python strings in a set (about 300 bytes per row); the listing's digests are looked
up in it with a binary search. Two different keys share a digest with probability about
n²/2¹²⁹ (below 10⁻²⁵ for 10⁸ files), so no file is ever skipped by mistake in practice.
``flowscore bench --tables`` measures it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import tables
from .archive import ArchiveListing

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog

    from .archive import ArchiveEntry

__all__ = ["key_digest", "done_digests", "pending"]

_DIGEST = np.dtype("S16")


def key_digest(image_uri: str, etag: str) -> bytes:
    """The 16-byte BLAKE2b digest of one ``(image_uri, etag)`` key."""
    return hashlib.blake2b(f"{image_uri}\0{etag}".encode(), digest_size=16).digest()


def _digests(pairs: Iterable[tuple[str, str]], count: int = -1) -> np.ndarray:
    return np.fromiter((key_digest(u, e) for u, e in pairs), dtype=_DIGEST, count=count)


def done_digests(catalog: Catalog, model_version: str) -> np.ndarray:
    """Sorted digests of every key done under ``model_version`` (see the module docstring)."""
    parts = [np.empty(0, _DIGEST)]
    for batch in tables.done_key_batches(catalog, model_version):
        uris = batch.column("image_uri").to_pylist()
        etags = batch.column("etag").to_pylist()
        parts.append(_digests(zip(uris, etags, strict=True), len(uris)))
        del uris, etags
    done = np.concatenate(parts)
    done.sort()
    return done


def pending(
    catalog: Catalog, model_version: str, listed: Sequence[ArchiveEntry]
) -> list[ArchiveEntry]:
    """The entries of ``listed`` not done under ``model_version``, in listing order. An
    :class:`~pipelines.archive.ArchiveListing` is read column by column: only the entries
    still to do are made."""
    done = done_digests(catalog, model_version)
    if not len(done):
        return list(listed)
    pairs = (
        listed.keys()
        if isinstance(listed, ArchiveListing)
        else ((e.image_uri, e.etag) for e in listed)
    )
    keys = _digests(pairs, len(listed))
    pos = np.searchsorted(done, keys)
    found = done[np.minimum(pos, len(done) - 1)] == keys
    del keys, pos
    return [listed[i] for i in np.flatnonzero(~found).tolist()]
