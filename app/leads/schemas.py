from datetime import datetime
from typing import Annotated, Any

import msgspec

from app.validation import NO_NUL, check_free_json


class LeadCreate(msgspec.Struct, forbid_unknown_fields=True):
    title: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL)]
    price_credits: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]
    details: dict[str, Any] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_free_json(self.details)


class LeadCreated(msgspec.Struct):
    id: int
    status: str


class LeadItem(msgspec.Struct):
    id: int
    title: str
    price_credits: int
    status: str


class LeadPage(msgspec.Struct):
    items: list[LeadItem]
    next_cursor: str | None


class LeadPurchaseOut(msgspec.Struct):
    purchase_id: int
    lead_id: int
    price_credits: int
    balance: int


class PurchasedLead(msgspec.Struct):
    purchase_id: int
    lead_id: int
    title: str
    price_credits: int
    details: dict[str, Any]
    purchased_at: datetime


class PurchasedLeadPage(msgspec.Struct):
    items: list[PurchasedLead]
    next_cursor: str | None
