"""What the worker does with the outbox: send each email over SMTP, or hold it while none is configured.

An email is sent outside any transaction, then marked sent under the fence. A worker
that dies between the two, or loses its lease, leaves the email to be sent again:
at least once, with the same Message-ID, so the receiving side can tell.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.failures import service as failures
from app.failures.models import FailureStatus, OperationKind
from app.notifications import mailer
from app.notifications.models import EmailStatus
from app.observability.metrics import WORK_DONE, Queue, WorkOutcome
from app.services import Services
from app.worker.leases import Claimed, Commit, claim_statement, fence_statement, fenced_attempt

_COLUMNS = "w.id, w.public_id, w.kind, w.recipient, w.payload"
# statuses inlined, not bound: a cached generic plan can then use the partial indexes (leases.py)
CLAIM = claim_statement(
    "outbox_emails", f"t.status IN ('{EmailStatus.PENDING}', '{EmailStatus.HELD}')", "t.id", _COLUMNS
)
_FENCE = fence_statement("outbox_emails")
_HOLD = text(
    "UPDATE outbox_emails SET status = :held WHERE id IN (SELECT id FROM outbox_emails"
    " WHERE status = :pending ORDER BY id LIMIT :batch FOR UPDATE SKIP LOCKED)"
)
_LOAD = text("SELECT id, public_id, kind, recipient, payload, status FROM outbox_emails WHERE id = :id")
_SENT = text(
    "UPDATE outbox_emails SET status = :sent, sent_at = now(), lease_token = NULL, lease_expires_at = NULL"
    " WHERE id = :id"
)
_SET = text(
    "UPDATE outbox_emails SET status = :status, lease_token = NULL, lease_expires_at = NULL WHERE id = :id"
)
_GIVE_UP = text("UPDATE outbox_emails SET status = :dead WHERE id = :id AND status <> :sent")


async def hold_emails(services: Services, batch: int) -> int:
    """With no SMTP server configured: pending emails become `held` (counted), to go out once one is."""
    params = {"held": EmailStatus.HELD, "pending": EmailStatus.PENDING, "batch": batch}
    async with services.sessions() as session, session.begin():
        held: int = (await session.execute(_HOLD, params)).rowcount  # type: ignore[attr-defined]
    if held:
        WORK_DONE.labels(Queue.OUTBOX, "any", WorkOutcome.HELD).inc(held)
    return held


async def _deliver(services: Services, row: Any) -> Commit:
    message = mailer.compose(
        services.settings,
        kind=row.kind,
        public_id=row.public_id,
        recipient=row.recipient,
        payload=row.payload,
    )
    await mailer.send(services.settings, message)

    async def commit(conn: AsyncConnection) -> str:
        await conn.execute(_SENT, {"id": row.id, "sent": EmailStatus.SENT})
        return WorkOutcome.DONE

    return commit


async def send_email(services: Services, item: Claimed) -> str:
    """First attempt at a claimed email: sent and marked sent, or recorded as a failed operation."""
    row = item.row

    async def perform() -> Commit:
        return await _deliver(services, row)

    async def succeed(conn: AsyncConnection, now: datetime, outcome: str) -> str:
        return outcome

    async def fail(conn: AsyncConnection, now: datetime, error: str, permanent: bool) -> str:
        state = await failures.record_failure(
            conn,
            services.settings,
            kind=OperationKind.EMAIL,
            reference=str(row.id),
            item_id=row.id,
            payload={"email_id": row.id, "kind": row.kind},
            now=now,
            error=error,
            permanent=permanent,
        )
        dead = state.status == FailureStatus.DEAD
        await conn.execute(_SET, {"id": row.id, "status": EmailStatus.DEAD if dead else EmailStatus.FAILED})
        return WorkOutcome.DEAD if dead else WorkOutcome.FAILED

    outcome = await fenced_attempt(services.sessions, _FENCE, item, perform, succeed, fail)
    WORK_DONE.labels(Queue.OUTBOX, row.kind, outcome).inc()
    return outcome


class EmailSending:
    """A failed email's retry: send it again (same Message-ID) under the failed operation's lease."""

    async def perform(self, services: Services, item_id: int | None, payload: dict[str, Any]) -> Commit:
        async with services.sessions() as session:
            row = (await session.execute(_LOAD, {"id": item_id})).first()
        if row is None or row.status == EmailStatus.SENT:

            async def nothing(conn: AsyncConnection) -> str:
                return WorkOutcome.DONE

            return nothing
        return await _deliver(services, row)

    async def give_up(self, conn: AsyncConnection, item_id: int | None) -> None:
        await conn.execute(_GIVE_UP, {"id": item_id, "dead": EmailStatus.DEAD, "sent": EmailStatus.SENT})
