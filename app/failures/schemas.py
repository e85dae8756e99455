from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec


class FailedOperationOut(msgspec.Struct, kw_only=True):
    id: int
    kind: str
    reference: str
    status: str
    attempts: int
    max_attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    suspended: bool
    created_at: datetime
    updated_at: datetime


class FailedOperationPage(msgspec.Struct):
    items: list[FailedOperationOut]
    next_cursor: str | None


class AttemptOut(msgspec.Struct):
    attempt: int
    at: str
    outcome: str
    error: str | None


class FailureDetail(FailedOperationOut, kw_only=True):
    item_id: int | None
    payload: dict[str, Any]
    history: list[AttemptOut]
