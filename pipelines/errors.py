"""Exceptions as users see them: the causes behind one (storage, tracking, scoring) and one
redacted line for a message (one definition of each)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

__all__ = ["exception_chain", "find_in_chain", "one_line"]

E = TypeVar("E", bound=BaseException)


def exception_chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception behind it: ``__cause__``, ``__context__`` and the ``cause``
    of Ray's task errors, each once, breadth first."""
    seen: set[int] = set()
    queue: list[BaseException] = [e]
    while queue:
        x = queue.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        for nxt in (getattr(x, "cause", None), x.__cause__, x.__context__):
            if isinstance(nxt, BaseException):
                queue.append(nxt)


def find_in_chain(e: BaseException, kind: type[E]) -> E | None:
    """The first exception of type ``kind`` in :func:`exception_chain` of ``e``, or None."""
    for x in exception_chain(e):
        if isinstance(x, kind):
            return x
    return None


def one_line(e: BaseException, *, with_type: bool = True, limit: int = 300) -> str:
    """The first line of ``e``'s message, after ``TypeName: `` (``with_type``), credentials
    redacted, at most ``limit`` characters; the type name alone for an empty message."""
    from .redact import redact

    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    if with_type or not first:
        first = f"{type(e).__name__}: {first}" if first else type(e).__name__
    text = redact(first)
    return text if len(text) <= limit else text[: limit - 3] + "..."
