"""Input rules every domain's schemas share: PostgreSQL text cannot hold NUL, so it never gets in."""

from __future__ import annotations

from typing import Any

NO_NUL = r"^[^\x00]*$"  # the pattern for every free-text field of a request


def reject_nul(value: Any) -> None:
    """Walk a decoded JSON value; raise ValueError (a 400 through msgspec) on any NUL in keys or strings."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("strings must not contain NUL characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            reject_nul(key)
            reject_nul(item)
    elif isinstance(value, list):
        for item in value:
            reject_nul(item)
