from datetime import datetime
from typing import Annotated, Any

import msgspec

from app.errors.models import SERVER_SOURCE, Severity
from app.validation import NO_NUL, check_free_json

MESSAGE_MAX_CHARS = 4096
# a short name of the reporting part (web, ios, checkout/payment-form): a filter in the admin list
SOURCE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$"
CONTEXT_MAX_DEPTH = 8  # the context object itself is level 1; its size is bounded by the body limit


class ErrorReport(msgspec.Struct, forbid_unknown_fields=True):
    severity: Severity
    message: Annotated[str, msgspec.Meta(min_length=1, max_length=MESSAGE_MAX_CHARS, pattern=NO_NUL)]
    source: Annotated[str, msgspec.Meta(pattern=SOURCE_PATTERN)]
    context: dict[str, Any] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source.lower() == SERVER_SOURCE:
            raise ValueError(f"source '{SERVER_SOURCE}' is kept for the service's own errors")
        check_free_json(self.context, CONTEXT_MAX_DEPTH)


class ErrorAccepted(msgspec.Struct):
    id: int


class ErrorLogOut(msgspec.Struct, kw_only=True):
    id: int
    severity: str
    source: str
    message: str
    context: dict[str, Any]
    user_id: str | None
    request_id: str | None
    created_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None


class ErrorLogPage(msgspec.Struct):
    items: list[ErrorLogOut]
    next_cursor: str | None
