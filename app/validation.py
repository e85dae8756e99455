"""Input rules every domain's schemas share: PostgreSQL text cannot hold NUL, so it never gets in."""

from __future__ import annotations

from typing import Any

NO_NUL = r"^[^\x00]*$"  # the pattern for every free-text field of a request
# free-form JSON (lead details) nests at most this deep, the value itself being level 1: deep enough
# for any real document, and far below where Python's recursion (JSON encoding for JSONB) gives out
MAX_JSON_DEPTH = 32


def check_free_json(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Walk a decoded JSON value without recursion; ValueError (a 400 through msgspec) on a NUL in any
    key or string, or on objects and arrays nested deeper than `max_depth`."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise ValueError("strings must not contain NUL characters")
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise ValueError(f"objects and arrays must not nest deeper than {max_depth} levels")
            if isinstance(item, dict):
                if any("\x00" in key for key in item):
                    raise ValueError("strings must not contain NUL characters")
                item = item.values()
            pending.extend((child, depth + 1) for child in item)
