"""Helpers for reading exceptions that arrive wrapped (a library error raised ``from`` another)."""
from __future__ import annotations

from typing import Iterator


def exception_chain(e: BaseException | None) -> Iterator[BaseException]:
    """``e``, then its ``__cause__`` (or ``__context__``), and so on; each exception once."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__
