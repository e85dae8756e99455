"""Settings: every field has a reader, and a bad value stops the start with one clear message."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from app.config import Settings

APP = Path(__file__).resolve().parents[2] / "app"


def test_every_setting_is_read_by_the_app() -> None:
    # a setting nobody reads promises behaviour that does not exist (no setting without a reader)
    source = "\n".join(p.read_text(encoding="utf-8") for p in APP.rglob("*.py") if p != APP / "config.py")
    unread = [f.name for f in msgspec.structs.fields(Settings) if not re.search(rf"\.{f.name}\b", source)]
    assert unread == []
