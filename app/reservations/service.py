"""Ticket holds that never oversell and stop counting the instant they expire.

A hold locks its ticket type's row, then counts what is taken (sold tickets and unexpired
active holds) in a statement that starts after the lock is granted, so it sees every hold
committed before it. Expiry needs no job: every count and read compares `expires_at`
with the database's clock; the cleanup job only writes `expired` down (`expire_holds`).
"""

from __future__ import annotations

from sqlalchemy import text

from app.context import Caller
from app.idempotency import service as keys
from app.idempotency.service import Finish, Key, KeyedRequest, RecoveryPoint, Result, step
from app.problems import NotFound, ServiceError
from app.ratelimit import service as ratelimit
from app.ratelimit.service import RateAction
from app.reservations.models import ReservationStatus
from app.reservations.schemas import (
    Cancelled,
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


class TooManyTickets(ServiceError):
    status, type, title = 400, "validation-error", "Too many tickets in one hold"


ACTIVE, EXPIRED = ReservationStatus.ACTIVE, ReservationStatus.EXPIRED
# held: unexpired active holds; a hold past expires_at is expired whatever its status column says
_HELD = (
    "(SELECT coalesce(sum(r.quantity), 0) FROM reservations r WHERE r.ticket_type_id = :type_id"  # noqa: S608
    f" AND r.status = '{ACTIVE}' AND r.expires_at > now())"
)
_LOCK_TYPE = text("SELECT capacity, sold FROM ticket_types WHERE id = :type_id FOR UPDATE")
# a statement of its own after _LOCK_TYPE: its snapshot includes every hold committed before the lock
_HOLD = text(
    "INSERT INTO reservations (user_id, ticket_type_id, quantity, status, expires_at)"
    f" SELECT :user_id, :type_id, CAST(:quantity AS integer), '{ACTIVE}',"
    " now() + make_interval(secs => CAST(:ttl_s AS double precision))"
    f" WHERE CAST(:sold AS bigint) + {_HELD} + CAST(:quantity AS integer) <= CAST(:capacity AS bigint)"
    " RETURNING id, expires_at"
)
_TYPE = text(
    f"SELECT id, name, capacity, capacity - sold - {_HELD} AS available, price, currency"  # noqa: S608
    " FROM ticket_types WHERE id = :type_id"
)
# what a reservation is now: an active hold past its expiry reads as expired
_EFFECTIVE = f"CASE WHEN status = '{ACTIVE}' AND expires_at <= now() THEN '{EXPIRED}' ELSE status END"
_RESERVATION = text(
    f"SELECT id, {_EFFECTIVE} AS status, ticket_type_id, quantity, expires_at FROM reservations"  # noqa: S608
    " WHERE id = :id AND user_id = :user_id"
)
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
        ticket_type = (await st.conn.execute(_LOCK_TYPE, {"type_id": type_id})).first()
        if ticket_type is None:
            raise NotFound(f"no ticket type {type_id}")
        held = (
            await st.conn.execute(
                _HOLD,
                {
                    "user_id": key.user_id,
                    "type_id": type_id,
                    "quantity": quantity,
                    "ttl_s": settings.reservation_ttl_s,
                    "sold": ticket_type.sold,
                    "capacity": ticket_type.capacity,
                },
            )
        ).first()
        if held is None:
            raise SoldOut(f"fewer than {quantity} tickets of type {type_id} are left", ticket_type_id=type_id)
        out = ReservationOut(held.id, ACTIVE, type_id, quantity, held.expires_at)
        return await st.finish(201, out)


async def get_reservation(services: Services, caller: Caller, reservation_id: int) -> ReservationOut:
    """The caller's own reservation; another user's is not found, as if it did not exist."""
    async with services.sessions() as session:
        row = (await session.execute(_RESERVATION, {"id": reservation_id, "user_id": caller.user_id})).first()
    if row is None:
        raise NotFound(f"no reservation {reservation_id}")
    return ReservationOut(*row)


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
        awaiting_cleanup=sum(row.unmarked for row in rows),
        oldest_active_at=oldest,
    )


async def expire_holds(services: Services, batch: int) -> int:
    """Mark up to `batch` holds past their expiry `expired` (the cleanup job); returns how many.

    Capacity does not wait for this: expired holds stopped counting when they expired.
    """
    async with services.sessions() as session, session.begin():
        result = await session.execute(_EXPIRE, {"batch": batch})
    return int(result.rowcount)  # type: ignore[attr-defined]
