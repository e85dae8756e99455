"""The benchmark's asyncpg baseline is the same work as one HTTP lead purchase (bench/lead_purchase.py).

"HTTP against the same SQL through asyncpg" only means something while the SQL is the same. One
purchase goes over HTTP; the baseline makes the same purchase on a copy of the database taken just
before. Both must send PostgreSQL the same statements, with the same parameters, in the same
transactions, in the same order. Both sides are in the `$n` form SQLAlchemy's asyncpg dialect sends
(the baseline compiles the service's statements with it), so the text is compared as it is: a
different lock clause, column list or literal shows up as a text difference.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import make_url

from app.db.embedded import EmbeddedPostgres
from bench.lead_purchase import baseline_purchase, baseline_sql
from tests.fixtures.app import AppFactory, auth, create_lead, grant

BUYER = "bench-buyer"
Sent = list[str | tuple[str, tuple[Any, ...]]]  # "BEGIN" / "COMMIT" / "ROLLBACK", or (SQL, parameters)

# what a purchase leaves behind, as a buyer and the operator would look at it
_OUTCOME = """
SELECT (SELECT row(status, buyer_id)::text FROM leads WHERE id = $1) AS lead,
       (SELECT balance FROM credit_accounts WHERE user_id = $2) AS balance,
       (SELECT array_agg(row(lead_id, user_id, price_credits)::text) FROM lead_purchases) AS purchases,
       (SELECT array_agg(row(user_id, delta, balance_after, reason, reference)::text ORDER BY id)
          FROM credit_ledger) AS ledger,
       (SELECT array_agg(row(kind, user_id, recipient, payload, status)::text)
          FROM outbox_emails) AS emails,
       (SELECT array_agg(row(key, recovery_point, locked_at IS NULL, response_status, response_body)::text)
          FROM idempotency_keys WHERE user_id = $2) AS keys
"""


class _Recorder:
    """An asyncpg connection that notes what it sends, handed out as a pool's `acquire` would."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.sent: Sent = []

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[_Recorder]:
        yield self

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self.sent.append("BEGIN")
        try:
            async with self.conn.transaction():
                yield
        except BaseException:
            self.sent.append("ROLLBACK")
            raise
        self.sent.append("COMMIT")

    async def execute(self, sql: str, *args: Any) -> Any:
        self.sent.append((sql, args))
        return await self.conn.execute(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.sent.append((sql, args))
        return await self.conn.fetchval(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        self.sent.append((sql, args))
        return await self.conn.fetchrow(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> Any:
        self.sent.append((sql, args))
        return await self.conn.fetch(sql, *args)


async def _connect(pg: EmbeddedPostgres, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(host=pg.socket_dir, user="postgres", database=database)


async def test_the_baseline_sends_what_a_purchase_over_http_sends(
    make_client: AppFactory, pg: EmbeddedPostgres, db_url: str
) -> None:
    client = await make_client()
    services = client.app.state.services
    settings = services.settings
    await grant(client, BUYER, 100)
    lead_id = await create_lead(client, price=10, title="bench lead")

    # the baseline's database: this one as it is now (no session may be open on it while it is copied)
    engine = services.sessions.kw["bind"]
    await engine.dispose()
    database = make_url(db_url).database
    twin = f"{database}_baseline"
    admin = await _connect(pg, "postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{twin}" TEMPLATE "{database}"')

        by_service: Sent = []
        hooks: dict[str, Any] = {
            "before_cursor_execute": lambda _c, _cur, sql, params, _ctx, _many: by_service.append(
                (sql, tuple(params))
            ),
            "begin": lambda _c: by_service.append("BEGIN"),
            "commit": lambda _c: by_service.append("COMMIT"),
            "rollback": lambda _c: by_service.append("ROLLBACK"),
        }
        for name, hook in hooks.items():
            event.listen(engine.sync_engine, name, hook)
        try:
            r = await client.post(
                f"/v1/leads/{lead_id}/purchase", headers=auth(BUYER, key=f"bench-{lead_id}")
            )
        finally:
            for name, hook in hooks.items():
                event.remove(engine.sync_engine, name, hook)
        assert r.status_code == 201, r.text

        baseline = _Recorder(await _connect(pg, twin))
        try:
            purchase = baseline_purchase(
                baseline.acquire,
                baseline_sql(),
                rate_limit=settings.rate_lead_purchases,
                window_s=settings.rate_window_s,
            )
            assert await purchase(lead_id, BUYER) == 201
            after_baseline = await baseline.conn.fetchrow(_OUTCOME, lead_id, BUYER)
        finally:
            await baseline.conn.close()
        await engine.dispose()
        service_db = await _connect(pg, database)
        try:
            after_service = await service_db.fetchrow(_OUTCOME, lead_id, BUYER)
        finally:
            await service_db.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{twin}" WITH (FORCE)')
        await admin.close()

    assert baseline.sent == by_service
    # not two empty lists: the service sent every statement the baseline takes from it
    sent_sql = [s[0] for s in by_service if not isinstance(s, str)]
    assert [sql for sql, _ in baseline_sql().values() if sql not in sent_sql] == []
    assert dict(after_baseline) == dict(after_service)
    assert after_service["lead"] == f"(sold,{BUYER})" and after_service["balance"] == 90
