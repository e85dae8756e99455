from datetime import datetime
from typing import Annotated

import msgspec

from app.validation import NO_NUL

Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL)]
UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=NO_NUL)]
PositiveCredits = Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]


class Package(msgspec.Struct):
    id: str
    credits: int
    amount: int
    currency: str


class PurchaseRequest(msgspec.Struct, forbid_unknown_fields=True):
    package_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]


class PurchaseOut(msgspec.Struct):
    purchase_id: int
    payment_intent_id: str
    client_secret: str
    status: str
    credits: int
    amount: int
    currency: str


class Balance(msgspec.Struct):
    user_id: str
    balance: int


class LedgerItem(msgspec.Struct):
    id: int
    delta: int
    reason: str
    reference: str
    created_at: datetime


class LedgerPage(msgspec.Struct):
    items: list[LedgerItem]
    next_cursor: str | None


class GrantRequest(msgspec.Struct, forbid_unknown_fields=True):
    user_id: UserId
    credits: PositiveCredits
    reason: Reason


class GrantOut(msgspec.Struct):
    entry_id: int
    balance: int


class PurchaseState(msgspec.Struct):
    """A purchase as its buyer can poll it after paying."""

    purchase_id: int
    payment_intent_id: str | None
    status: str  # pending, succeeded, failed, refunded, abandoned
    credits: int
    amount: int
    currency: str
    created_at: datetime
    updated_at: datetime
