"""Error logs: client reports and the service's own unhandled exceptions, scrubbed before storage.

Nothing is stored as received: messages and contexts go through `app.errors.scrub` first (see there
for what counts as a secret), so a token or a card number a client or a traceback carries never
reaches the table, an idempotency key's stored parameters, or Sentry.
"""

from __future__ import annotations

import logging
import traceback
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.context import Caller
from app.errors.models import SERVER_SOURCE, ErrorLog, Severity
from app.errors.schemas import MESSAGE_MAX_CHARS, ErrorAccepted, ErrorLogOut, ErrorLogPage, ErrorReport
from app.errors.scrub import scrub_json, scrub_text
from app.http import ServerFault
from app.idempotency import service as keys
from app.idempotency.service import Finish, Key, KeyedRequest, RecoveryPoint, Result, step
from app.observability.logging import request_id
from app.observability.metrics import ERRORS_RECORDED, ErrorSource
from app.pagination import page, parse_cursor
from app.problems import NotFound
from app.ratelimit import service as ratelimit
from app.ratelimit.service import RateAction
from app.services import Services

log = logging.getLogger("payguard.errors")

TRACEBACK_FRAMES = 20  # the innermost frames of a server exception's traceback that are kept

_INSERT = text(
    "INSERT INTO error_logs (severity, source, message, context, user_id, request_id)"
    " VALUES (:severity, :source, :message, :context, :user_id, :request_id) RETURNING id"
).bindparams(bindparam("context", type_=JSONB))
_PRUNE = text(
    "DELETE FROM error_logs WHERE id IN"
    " (SELECT id FROM error_logs WHERE created_at < :before ORDER BY created_at LIMIT :batch)"
)


async def report_error(services: Services, request: KeyedRequest, report: ErrorReport) -> Result:
    """Store a client's error report, scrubbed; 202 with its id. An Idempotency-Key is optional."""
    keys.check_key(request.key, required=False)
    params = {
        "severity": report.severity,
        "source": report.source,
        # scrubbed before the key stores its parameters too
        "message": scrub_text(report.message),
        "context": scrub_json(report.context),
    }
    return await keys.run(services, request, params, {RecoveryPoint.STARTED: _store_report})


async def _store_report(services: Services, key: Key) -> Finish:
    settings = services.settings
    await ratelimit.hit(
        services.sessions,
        RateAction.ERROR_REPORT,
        key.user_id,
        settings.rate_error_reports,
        settings.rate_window_s,
    )
    async with step(services.sessions, key) as st:
        error_id = await st.conn.scalar(
            _INSERT, {**key.params, "user_id": key.user_id, "request_id": request_id.get()}
        )
        assert error_id is not None
        finished = await st.finish(202, ErrorAccepted(error_id))
    ERRORS_RECORDED.labels(ErrorSource.CLIENT, key.params["severity"]).inc()
    return finished


async def record_server_error(services: Services, fault: ServerFault) -> None:
    """Store an unhandled exception the client got a 500 for. Never raises: when the database is
    down the record is lost and a warning logged (the exception itself was logged in full)."""
    try:
        exc = fault.exc
        kind = type(exc)
        frames = traceback.extract_tb(exc.__traceback__)[-TRACEBACK_FRAMES:]
        context = {
            "route": fault.route,
            "method": fault.method,
            "exception": f"{kind.__module__}.{kind.__qualname__}",
            "traceback": [f"{f.filename}:{f.lineno} in {f.name}" for f in frames],
        }
        params: dict[str, Any] = {
            "severity": Severity.ERROR,
            "source": SERVER_SOURCE,
            # scrubbed whole, then cut: a cut first could leave half a card number unrecognised
            "message": scrub_text(f"{kind.__name__}: {exc}")[:MESSAGE_MAX_CHARS],
            "context": scrub_json(context),
            "user_id": None,
            "request_id": fault.request_id,
        }
        async with services.sessions() as session, session.begin():
            await session.execute(_INSERT, params)
    except Exception as error:
        log.warning("server error not recorded", extra={"error": type(error).__name__})
        return
    ERRORS_RECORDED.labels(ErrorSource.SERVER, Severity.ERROR).inc()


async def list_errors(
    services: Services,
    *,
    severity: str | None,
    source: str | None,
    resolved: bool | None,
    cursor: str | None,
    limit: int,
) -> ErrorLogPage:
    """Newest first."""
    before = parse_cursor(cursor)
    query = select(ErrorLog)
    if severity is not None:
        query = query.where(ErrorLog.severity == severity)
    if source is not None:
        query = query.where(ErrorLog.source == source)
    if resolved is not None:
        query = query.where(ErrorLog.resolved_at.is_not(None) if resolved else ErrorLog.resolved_at.is_(None))
    if before is not None:
        query = query.where(ErrorLog.id < before)
    async with services.sessions() as session:
        rows = (await session.scalars(query.order_by(ErrorLog.id.desc()).limit(limit + 1))).all()
    items, next_cursor = page(rows, limit)
    return ErrorLogPage([_out(r) for r in items], next_cursor)


async def resolve_error(services: Services, admin: Caller, error_id: int) -> ErrorLogOut:
    """Mark an error resolved by `admin`. Idempotent: resolving it again keeps the first who and when."""
    async with services.sessions() as session, session.begin():
        row = await session.get(ErrorLog, error_id, with_for_update=True)
        if row is None:
            raise NotFound(f"no error {error_id}")
        if row.resolved_at is None:
            row.resolved_at = await session.scalar(text("SELECT now()"))
            row.resolved_by = admin.user_id
    return _out(row)


def _out(r: ErrorLog) -> ErrorLogOut:
    return ErrorLogOut(
        id=r.id,
        severity=r.severity,
        source=r.source,
        message=r.message,
        context=r.context,
        user_id=r.user_id,
        request_id=r.request_id,
        created_at=r.created_at,
        resolved_at=r.resolved_at,
        resolved_by=r.resolved_by,
    )


async def prune_old_errors(db: AsyncConnection | AsyncSession, before: datetime, batch: int) -> int:
    """Delete the error logs created before `before`, oldest first, at most `batch` rows per statement;
    returns how many went. Outside a transaction each batch commits on its own, so a backlog of
    millions never holds one long transaction with all its locks; inside the caller's transaction
    (a job holding its advisory lock) the batches are the caller's to commit."""
    total = 0
    params = {"before": before, "batch": batch}
    while True:
        if db.in_transaction():
            deleted = (await db.execute(_PRUNE, params)).rowcount  # type: ignore[attr-defined]
        else:
            async with db.begin():
                deleted = (await db.execute(_PRUNE, params)).rowcount  # type: ignore[attr-defined]
        total += int(deleted)
        if deleted < batch:
            return total
