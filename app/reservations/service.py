"""Ticket holds that never oversell and stop counting the instant they expire.

A hold locks its ticket type's row, then counts what is taken (sold tickets and unexpired
active holds) in a statement that starts after the lock is granted, so it sees every hold
committed before it. Expiry needs no job: every count and read compares `expires_at`
with the database's clock; the cleanup job only writes `expired` down (`expire_holds`).
"""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.context import Caller
from app.failures.engine import NeedsHuman, RetryLater
from app.idempotency import service as keys
from app.idempotency.service import Finish, Key, KeyedRequest, MoveTo, Phases, RecoveryPoint, Result, step
from app.notifications import service as notifications
from app.observability.metrics import (
    PURCHASES,
    RESERVATIONS,
    PurchaseKind,
    PurchaseOutcome,
    ReservationOutcome,
)
from app.problems import NotFound, PaymentKeyConflict, ServiceError
from app.ratelimit import service as ratelimit
from app.ratelimit.service import RateAction
from app.reservations.models import ReservationStatus
from app.reservations.schemas import (
    Cancelled,
    CheckoutOut,
    ReservationOut,
    ReservationStats,
    TicketTypeCreated,
    TicketTypeOut,
)
from app.services import Services


class SoldOut(ServiceError):
    status, type, title = 409, "sold-out", "Not enough tickets left"


class ReservationNotActive(ServiceError):
    status, type, title = 409, "reservation-not-active", "The reservation is not active"


class ReservationExpired(ServiceError):
    status, type, title = 409, "reservation-expired", "The reservation has expired"


class TooManyTickets(ServiceError):
    status, type, title = 400, "validation-error", "Too many tickets in one hold"


ACTIVE, EXPIRED = ReservationStatus.ACTIVE, ReservationStatus.EXPIRED
# held: unexpired active holds; a hold past expires_at is expired whatever its status column says
_HELD = (
    "(SELECT coalesce(sum(r.quantity), 0) FROM reservations r WHERE r.ticket_type_id = :type_id"  # noqa: S608
    f" AND r.status = '{ACTIVE}' AND r.expires_at > now())"
)
# what is left of ticket type :type_id: capacity less sold tickets and unexpired holds
_LEFT = f"capacity - sold - {_HELD}"
_LOCK_TYPE = text("SELECT id FROM ticket_types WHERE id = :type_id FOR UPDATE")
# a statement of its own after _LOCK_TYPE: its snapshot includes every hold committed before the lock
_HOLD = text(
    "INSERT INTO reservations (user_id, ticket_type_id, quantity, status, expires_at)"  # noqa: S608
    f" SELECT :user_id, id, CAST(:quantity AS integer), '{ACTIVE}',"
    " now() + make_interval(secs => CAST(:ttl_s AS double precision))"
    f" FROM ticket_types WHERE id = :type_id AND {_LEFT} >= CAST(:quantity AS integer)"
    " RETURNING id, expires_at"
)
_TYPE = text(
    f"SELECT id, name, capacity, {_LEFT} AS available, price, currency"  # noqa: S608
    " FROM ticket_types WHERE id = :type_id"
)
# what a reservation is now: an active hold past its expiry reads as expired
_EFFECTIVE = f"CASE WHEN status = '{ACTIVE}' AND expires_at <= now() THEN '{EXPIRED}' ELSE status END"
_RESERVATION = text(
    f"SELECT id, {_EFFECTIVE} AS status, ticket_type_id, quantity, expires_at FROM reservations"  # noqa: S608
    " WHERE id = :id AND user_id = :user_id"
)
_TICKETS = text("SELECT code FROM tickets WHERE reservation_id = :id ORDER BY id")
_CANCEL = text(
    f"UPDATE reservations SET status = '{ReservationStatus.CANCELLED}', updated_at = now()"  # noqa: S608
    f" WHERE id = :id AND user_id = :user_id AND status = '{ACTIVE}' AND expires_at > now() RETURNING id"
)
_STATS = text(
    f"SELECT {_EFFECTIVE} AS status, count(*) AS n,"  # noqa: S608
    f" count(*) FILTER (WHERE status = '{ACTIVE}' AND expires_at <= now()) AS unmarked,"
    f" min(created_at) FILTER (WHERE status = '{ACTIVE}') AS oldest FROM reservations GROUP BY 1"
)
_EXPIRE = text(
    f"UPDATE reservations SET status = '{EXPIRED}', updated_at = now() WHERE id IN"  # noqa: S608
    f" (SELECT id FROM reservations WHERE status = '{ACTIVE}' AND expires_at <= now()"
    " ORDER BY expires_at LIMIT :batch FOR UPDATE SKIP LOCKED)"
)


async def create_ticket_type(
    services: Services, request: KeyedRequest, *, name: str, capacity: int, price: int, currency: str
) -> Result:
    keys.check_key(request.key, required=False)
    params = {"name": name, "capacity": capacity, "price": price, "currency": currency}
    return await keys.run(services, request, params, {RecoveryPoint.STARTED: _insert_ticket_type})


async def _insert_ticket_type(services: Services, key: Key) -> Finish:
    async with step(services.sessions, key) as st:
        type_id = await st.conn.scalar(
            text(
                "INSERT INTO ticket_types (name, capacity, sold, price, currency)"
                " VALUES (:name, :capacity, 0, :price, :currency) RETURNING id"
            ),
            dict(key.params),
        )
        assert type_id is not None
        return await st.finish(201, TicketTypeCreated(type_id))


async def get_ticket_type(services: Services, type_id: int) -> TicketTypeOut:
    async with services.sessions() as session:
        row = (await session.execute(_TYPE, {"type_id": type_id})).first()
    if row is None:
        raise NotFound(f"no ticket type {type_id}")
    return TicketTypeOut(*row)


async def hold_tickets(
    services: Services, caller: Caller, request: KeyedRequest, *, ticket_type_id: int, quantity: int
) -> Result:
    """Hold `quantity` tickets for PAYGUARD_RESERVATION_TTL_S: never more than the capacity, whatever
    the concurrency (holds of one ticket type queue on its row)."""
    keys.check_key(request.key, required=False)
    if quantity > services.settings.reservation_max_quantity:
        raise TooManyTickets(
            f"at most {services.settings.reservation_max_quantity} tickets per hold", quantity=quantity
        )
    params = {"ticket_type_id": ticket_type_id, "quantity": quantity}
    return await keys.run(services, request, params, {RecoveryPoint.STARTED: _hold})


async def _hold(services: Services, key: Key) -> Finish:
    """started: lock the ticket type, count what is taken, insert the hold if it fits."""
    settings = services.settings
    await ratelimit.hit(
        services.sessions,
        RateAction.RESERVATION,
        key.user_id,
        settings.rate_reservations,
        settings.rate_window_s,
    )
    type_id, quantity = key.params["ticket_type_id"], key.params["quantity"]
    async with step(services.sessions, key) as st:
        if (await st.conn.scalar(_LOCK_TYPE, {"type_id": type_id})) is None:
            raise NotFound(f"no ticket type {type_id}")
        held = (
            await st.conn.execute(
                _HOLD,
                {
                    "user_id": key.user_id,
                    "type_id": type_id,
                    "quantity": quantity,
                    "ttl_s": settings.reservation_ttl_s,
                },
            )
        ).first()
        if held is None:
            RESERVATIONS.labels(ReservationOutcome.SOLD_OUT).inc()
            raise SoldOut(f"fewer than {quantity} tickets of type {type_id} are left", ticket_type_id=type_id)
        RESERVATIONS.labels(ReservationOutcome.HELD).inc()
        out = ReservationOut(held.id, ACTIVE, type_id, quantity, held.expires_at)
        return await st.finish(201, out)


async def get_reservation(services: Services, caller: Caller, reservation_id: int) -> ReservationOut:
    """The caller's own reservation; another user's is not found, as if it did not exist."""
    async with services.sessions() as session:
        row = (await session.execute(_RESERVATION, {"id": reservation_id, "user_id": caller.user_id})).first()
        if row is None:
            raise NotFound(f"no reservation {reservation_id}")
        codes = list((await session.execute(_TICKETS, {"id": reservation_id})).scalars())
    return ReservationOut(row.id, row.status, row.ticket_type_id, row.quantity, row.expires_at, codes)


async def cancel_reservation(services: Services, caller: Caller, reservation_id: int) -> Cancelled:
    """Release an active hold at once; an expired, completed or cancelled one is 409."""
    params = {"id": reservation_id, "user_id": caller.user_id}
    async with services.sessions() as session, session.begin():
        if await session.scalar(_CANCEL, params) is None:
            row = (await session.execute(_RESERVATION, params)).first()
            if row is None:
                raise NotFound(f"no reservation {reservation_id}")
            raise ReservationNotActive(
                f"reservation {reservation_id} is {row.status}", reservation_status=row.status
            )
    RESERVATIONS.labels(ReservationOutcome.CANCELLED).inc()
    return Cancelled(ReservationStatus.CANCELLED)


async def reservation_stats(services: Services) -> ReservationStats:
    async with services.sessions() as session:
        rows = (await session.execute(_STATS)).all()
    counts = {row.status: row.n for row in rows}
    oldest = min((row.oldest for row in rows if row.oldest is not None), default=None)
    return ReservationStats(
        active=counts.get(ACTIVE, 0),
        expired=counts.get(ReservationStatus.EXPIRED, 0),
        completed=counts.get(ReservationStatus.COMPLETED, 0),
        cancelled=counts.get(ReservationStatus.CANCELLED, 0),
        refunded=counts.get(ReservationStatus.REFUNDED, 0),
        awaiting_cleanup=sum(row.unmarked for row in rows),
        oldest_active_at=oldest,
    )


_OLDEST_ACTIVE = text(f"SELECT min(created_at) FROM reservations WHERE status = '{ACTIVE}'")  # noqa: S608


async def oldest_active_hold(conn: AsyncConnection) -> datetime | None:
    """When the oldest hold still marked active was made (the scrape's gauge: old means cleanup stalled)."""
    oldest: datetime | None = await conn.scalar(_OLDEST_ACTIVE)
    return oldest


async def expire_holds(services: Services, batch: int) -> int:
    """Mark up to `batch` holds past their expiry `expired` (the cleanup job); returns how many.

    Capacity does not wait for this: expired holds stopped counting when they expired.
    """
    async with services.sessions() as session, session.begin():
        result = await session.execute(_EXPIRE, {"batch": batch})
    expired = int(result.rowcount)  # type: ignore[attr-defined]
    RESERVATIONS.labels(ReservationOutcome.EXPIRED).inc(expired)
    return expired


# --- checkout: a PaymentIntent for the hold, through the same atomic phases as credit purchases ---

RESERVATION_METADATA = "payguard_reservation_id"  # on every intent we create; never trusted alone

_LOCK_OWN = text(
    "SELECT r.id, r.status, r.expires_at > now() AS live, r.quantity, t.price, t.currency"
    " FROM reservations r JOIN ticket_types t ON t.id = r.ticket_type_id"
    " WHERE r.id = :id AND r.user_id = :user_id FOR UPDATE OF r"
)
# the Stripe key is set once: a second checkout of the hold gets the same intent from Stripe
_PRICE = text(
    "UPDATE reservations SET amount = :amount, currency = :currency, recipient = :recipient,"
    " stripe_idempotency_key = coalesce(stripe_idempotency_key, :stripe_key), updated_at = now()"
    " WHERE id = :id RETURNING stripe_idempotency_key"
)
_PRICED = text(
    "SELECT id, user_id, amount, currency, stripe_idempotency_key FROM reservations WHERE id = :id"
)
_SET_INTENT = text(
    "UPDATE reservations SET payment_intent_id = :intent_id, updated_at = now() WHERE id = :id"
)


async def checkout_reservation(
    services: Services, caller: Caller, request: KeyedRequest, reservation_id: int
) -> Result:
    """Pay for an active hold: exactly one PaymentIntent per reservation, whatever is retried.

    Phases: `started` locks the hold, prices it and gives it a random Stripe key (kept by every later
    checkout of it); `checkout_created` asks Stripe for the intent with that key and stores it.
    The hold is not extended: a payment that arrives after it expired is handled as late.
    """
    keys.check_key(request.key, required=True)
    services.payments.require()
    params = {"reservation_id": reservation_id, "recipient": caller.email}
    try:
        result = await keys.run(services, request, params, CHECKOUT_PHASES)
    except ServiceError as exc:
        if exc.status >= 500:
            PURCHASES.labels(PurchaseKind.TICKETS, PurchaseOutcome.FAILED).inc()
        raise
    if not result.replayed:
        outcome = PurchaseOutcome.CREATED if result.status < 400 else PurchaseOutcome.REJECTED
        PURCHASES.labels(PurchaseKind.TICKETS, outcome).inc()
    return result


async def _price_checkout(services: Services, key: Key) -> MoveTo:
    """started: the hold is the caller's and still active; its amount and Stripe key are recorded."""
    reservation_id = key.params["reservation_id"]
    async with step(services.sessions, key) as st:
        r = (await st.conn.execute(_LOCK_OWN, {"id": reservation_id, "user_id": key.user_id})).first()
        if r is None:
            raise NotFound(f"no reservation {reservation_id}")
        if r.status == ACTIVE and not r.live:
            raise ReservationExpired(f"reservation {reservation_id} has expired; hold the tickets again")
        if r.status != ACTIVE:
            raise ReservationNotActive(
                f"reservation {reservation_id} is {r.status}", reservation_status=r.status
            )
        await st.conn.execute(
            _PRICE,
            {
                "id": reservation_id,
                "amount": r.price * r.quantity,
                "currency": r.currency,
                "recipient": key.params.get("recipient"),
                "stripe_key": f"payguard-reservation-{uuid.uuid4()}",
            },
        )
        return await st.move(RecoveryPoint.CHECKOUT_CREATED)


async def _create_checkout_intent(services: Services, key: Key) -> Finish:
    """checkout_created: one PaymentIntent at Stripe, whatever happened to earlier attempts."""
    async with services.sessions() as session:
        r = (await session.execute(_PRICED, {"id": key.params["reservation_id"]})).one()
    body: CheckoutOut | dict[str, Any]
    try:
        intent = await services.payments.create_payment_intent(
            amount=r.amount,
            currency=r.currency,
            metadata={RESERVATION_METADATA: str(r.id), "payguard_user_id": r.user_id},
            idempotency_key=r.stripe_idempotency_key,
        )
    except PaymentKeyConflict as exc:  # final: a retry would get the same refusal
        async with step(services.sessions, key) as st:
            return await st.finish(exc.status, exc.problem())
    body = CheckoutOut(intent.id, intent.client_secret, r.amount, r.currency)
    async with step(services.sessions, key) as st:
        await st.conn.execute(_SET_INTENT, {"id": r.id, "intent_id": intent.id})
        return await st.finish(201, body)


CHECKOUT_PHASES: Phases = {
    RecoveryPoint.STARTED: _price_checkout,
    RecoveryPoint.CHECKOUT_CREATED: _create_checkout_intent,
}


# --- payment: tickets issued once; a late payment honoured if there is room, refunded if not ---


class Checkout(StrEnum):
    """What a payment_intent.succeeded did to a reservation (the webhook event's recorded outcome)."""

    COMPLETED = "completed"  # paid in time: tickets issued
    HONOURED = "honoured"  # paid after the hold expired or was cancelled, and the tickets still fit
    REFUNDED = "refunded"  # paid too late with no room left: Stripe refunded it
    UNCHANGED = "unchanged"  # already completed or refunded: a duplicate
    NOT_OURS = "not_ours"  # no reservation has this intent


_PAID = (
    "SELECT r.id, r.user_id, r.status, r.expires_at > now() AS live, r.quantity, r.amount, r.currency,"
    " r.stripe_idempotency_key, r.recipient, r.ticket_type_id, t.name AS ticket_type"
    " FROM reservations r JOIN ticket_types t ON t.id = r.ticket_type_id"
    " WHERE r.payment_intent_id = :intent_id"
)
_BY_INTENT = text(_PAID)
_LOCK_BY_INTENT = text(_PAID + " FOR UPDATE OF r")
# a statement after _LOCK_TYPE (see _HOLD): what is left once sold tickets and unexpired holds count
_ROOM = text(f"SELECT {_LEFT} FROM ticket_types WHERE id = :type_id")  # noqa: S608
_SELL = text("UPDATE ticket_types SET sold = sold + :quantity WHERE id = :type_id")
_SET_STATUS = text("UPDATE reservations SET status = :status, updated_at = now() WHERE id = :id")
_ISSUE = text(
    "INSERT INTO tickets (reservation_id, code) SELECT :id, code FROM unnest(CAST(:codes AS text[])) AS code"
)
_FINAL = (ReservationStatus.COMPLETED, ReservationStatus.REFUNDED)


def _counted(r: Any) -> bool:
    """An unexpired active hold: its tickets are already counted against capacity."""
    return bool(r.status == ACTIVE and r.live)


async def _fits(conn: AsyncConnection, r: Any, *, lock: bool) -> bool:
    if _counted(r):
        return True
    if lock:
        await conn.execute(_LOCK_TYPE, {"type_id": r.ticket_type_id})
    room = await conn.scalar(_ROOM, {"type_id": r.ticket_type_id})
    return bool(room is not None and room >= r.quantity)


def _priced_as_paid(r: Any, amount: int, currency: str) -> bool:
    return bool((r.amount, r.currency) == (amount, currency.lower()))


def _check_amount(r: Any, amount: int, currency: str) -> None:
    if not _priced_as_paid(r, amount, currency):
        PURCHASES.labels(PurchaseKind.TICKETS, PurchaseOutcome.MISMATCH).inc()
        raise NeedsHuman(
            f"Stripe reports {amount} {currency} for reservation {r.id},"
            f" which expects {r.amount} {r.currency}: no tickets were issued"
        )


async def refund_if_no_room(services: Services, *, intent_id: str, amount: int, currency: str) -> bool:
    """Before the handler's transaction, outside it: a payment for a hold that expired or was cancelled,
    whose tickets no longer fit, is refunded at Stripe. The refund's key is derived from the
    reservation's Stripe key, so however often this runs (a crash before the commit, a second
    event about the intent), Stripe refunds once. True if refunded: the commit records it."""
    async with services.sessions() as session:
        conn = await session.connection()
        r = (await conn.execute(_BY_INTENT, {"intent_id": intent_id})).first()
        if r is None or r.status in _FINAL or not _priced_as_paid(r, amount, currency):
            return False  # not ours, done already, or a mismatch the commit reports
        if await _fits(conn, r, lock=False):
            return False
    await services.payments.refund_payment(
        intent_id=intent_id, idempotency_key=f"{r.stripe_idempotency_key}-refund"
    )
    return True


async def settle_paid_checkout(
    conn: AsyncConnection, *, intent_id: str, amount: int, currency: str, refunded: bool
) -> str:
    """payment_intent.succeeded for a reservation, in the handler's transaction: tickets issued exactly
    once per intent, only if amount and currency match. A hold paid in time completes; one paid after
    it expired or was cancelled is honoured if its tickets still fit; otherwise `refund_if_no_room`
    refunded it before this transaction (`refunded`), or this attempt fails and the next refunds."""
    r = (await conn.execute(_LOCK_BY_INTENT, {"intent_id": intent_id})).first()
    if r is None:
        return Checkout.NOT_OURS
    _check_amount(r, amount, currency)
    if r.status in _FINAL:
        if refunded and r.status == ReservationStatus.COMPLETED:
            raise NeedsHuman(f"reservation {r.id} was refunded at Stripe although its tickets were issued")
        return Checkout.UNCHANGED
    if refunded:
        await conn.execute(_SET_STATUS, {"id": r.id, "status": ReservationStatus.REFUNDED})
        RESERVATIONS.labels(ReservationOutcome.REFUNDED).inc()
        return Checkout.REFUNDED
    late = not _counted(r)
    if not await _fits(conn, r, lock=True):
        raise RetryLater(
            f"reservation {r.id} was paid late and its tickets no longer fit: it will be refunded"
        )
    codes = [secrets.token_urlsafe(16) for _ in range(r.quantity)]
    await conn.execute(_SELL, {"type_id": r.ticket_type_id, "quantity": r.quantity})
    await conn.execute(_SET_STATUS, {"id": r.id, "status": ReservationStatus.COMPLETED})
    await conn.execute(_ISSUE, {"id": r.id, "codes": codes})
    await notifications.enqueue_email(
        conn,
        notifications.Email(
            notifications.EmailKind.TICKETS_ISSUED,
            r.user_id,
            r.recipient,
            {"reservation_id": r.id, "ticket_type": r.ticket_type, "codes": codes},
        ),
    )
    RESERVATIONS.labels(ReservationOutcome.HONOURED if late else ReservationOutcome.COMPLETED).inc()
    PURCHASES.labels(PurchaseKind.TICKETS, PurchaseOutcome.SUCCEEDED).inc()
    return Checkout.HONOURED if late else Checkout.COMPLETED
