from datetime import datetime
from typing import Annotated

import msgspec

from app.validation import NO_NUL


class TicketTypeCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL)]
    capacity: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)]
    price: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)]  # per ticket, minor units
    currency: Annotated[str, msgspec.Meta(pattern="^[a-z]{3}$")]  # ISO 4217, lower case as Stripe has it


class TicketTypeCreated(msgspec.Struct):
    id: int


class TicketTypeOut(msgspec.Struct):
    id: int
    name: str
    capacity: int
    available: int  # capacity less sold tickets and unexpired holds
    price: int
    currency: str


class HoldCreate(msgspec.Struct, forbid_unknown_fields=True):
    ticket_type_id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    quantity: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]  # PAYGUARD_RESERVATION_MAX_QUANTITY bounds it


class ReservationOut(msgspec.Struct):
    id: int
    status: str
    ticket_type_id: int
    quantity: int
    expires_at: datetime
    tickets: list[str] = msgspec.field(default_factory=list)  # codes, once paid


class Cancelled(msgspec.Struct):
    status: str


class ReservationStats(msgspec.Struct):
    active: int  # holds not expired yet
    expired: int  # including active holds past their expiry the cleanup job has not marked yet
    completed: int
    cancelled: int
    refunded: int  # paid too late, with no room left
    awaiting_cleanup: int  # active holds past their expiry, still to be marked by the cleanup job
    oldest_active_at: datetime | None  # the oldest hold still marked active: old means cleanup stalled


class CheckoutOut(msgspec.Struct):
    payment_intent_id: str
    client_secret: str
    amount: int
    currency: str
