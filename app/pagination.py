"""Keyset pagination: the cursor is the id of the last item seen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from app.problems import InvalidCursor

MAX_ID = 2**63 - 1


class HasId(Protocol):
    @property
    def id(self) -> int: ...


T = TypeVar("T", bound=HasId)


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    # the length check comes first: int() refuses (with ValueError) strings over 4300 digits
    if len(cursor) > 19 or not cursor.isascii() or not cursor.isdigit() or not 0 < int(cursor) <= MAX_ID:
        raise InvalidCursor("cursor must be a value returned as next_cursor")
    return int(cursor)


def page(rows: Sequence[T], limit: int) -> tuple[list[T], str | None]:
    """`rows` was fetched with limit + 1: the extra row only says another page exists."""
    items = list(rows[:limit])
    return items, (str(items[-1].id) if len(rows) > limit else None)
