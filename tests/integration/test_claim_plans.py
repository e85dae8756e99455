"""Every queue's claim walks its due rows' partial index in order and stops at the batch.

A claim is prepared once per connection and run thousands of times; PostgreSQL soon runs it
with a cached generic plan, and a queue table's statistics are always stale. A claim planned
as a sort of the whole backlog, or as a walk of the primary key through every finished row,
costs O(backlog) per claim: it drained 100 events a second with 9,000 waiting
(docs/performance.md). These tests plan each claim in a transaction set up as `leases.claim`
sets one up, generic plan forced, on a table whose statistics say the opposite of what is due.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import pytest
from sqlalchemy import TextClause

from app.config import Settings
from app.db.engine import create_engine
from app.failures import service as failures
from app.notifications import tasks as emails
from app.webhooks import tasks as events
from app.worker.leases import IN_INDEX_ORDER
from tests.fixtures.worker_process import intent_ids, store_paid_events

CLAIMS = [
    pytest.param(events.CLAIM, "ix_webhook_events_pending", id="webhook_events"),
    pytest.param(emails.CLAIM, "ix_outbox_emails_unsent", id="outbox_emails"),
    pytest.param(failures.CLAIM, "ix_failed_operations_due", id="failed_operations"),
]


@pytest.mark.parametrize(("statement", "index"), CLAIMS)
async def test_a_claim_walks_its_partial_index_whatever_the_statistics(
    statement: TextClause,
    index: str,
    db: asyncpg.Connection,
    db_url: str,
    settings_for: Callable[..., Settings],
) -> None:
    # statistics taken while most events were finished: the planner believes almost nothing is due
    intents = intent_ids(2000)
    await store_paid_events(db, intents)
    await db.execute("UPDATE webhook_events SET status = 'handled' WHERE id % 50 <> 0")
    await db.execute("ANALYZE webhook_events, outbox_emails, failed_operations")

    engine = create_engine(settings_for(), db_url)
    try:
        conn = await engine.connect()  # as the worker keeps one for its claims
        try:
            sql = statement.text.replace(":batch", "$1").replace(":lease_s", "$2")
            async with conn.begin():  # as leases.claim runs a claim
                await conn.execute(IN_INDEX_ORDER)
                await conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
                await conn.exec_driver_sql(f"PREPARE claim(int, float8) AS {sql}")
                explained = await conn.exec_driver_sql("EXPLAIN EXECUTE claim(100, 60)")
                plan = "\n".join(r[0] for r in explained)
        finally:
            await conn.close()
    finally:
        await engine.dispose()
    assert f"Index Scan using {index}" in plan, plan
    for bad in ("Seq Scan", "Sort", "Bitmap"):
        assert bad not in plan, plan


async def test_an_event_claim_planned_on_an_empty_queue_stays_bounded_when_a_backlog_arrives(
    db: asyncpg.Connection,
    db_url: str,
    settings_for: Callable[..., Settings],
) -> None:
    # the claim's generic plan is cached while the table is empty (a new install, a quiet night)
    # and kept when a burst arrives: the ordering rule must still probe the index with each
    # candidate's object, not scan every unfinished event for each candidate
    engine = create_engine(settings_for(), db_url)
    try:
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            sql = events.CLAIM.text.replace(":batch", "$1").replace(":lease_s", "$2")
            await raw.execute("SET plan_cache_mode = force_generic_plan")
            await raw.execute(f"PREPARE claim(int, float8) AS {sql}")
            await raw.execute(f"BEGIN; {IN_INDEX_ORDER.text}; EXECUTE claim(10, 60); COMMIT")  # plan cached
            await store_paid_events(db, intent_ids(3000))
            async with raw.transaction():
                await raw.execute(IN_INDEX_ORDER.text)
                plan = await raw.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE claim(10, 60)")
    finally:
        await engine.dispose()
    top = plan[0]["Plan"]
    assert top["Actual Rows"] == 10, plan
    buffers = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    assert buffers < 300, plan  # scanning every unfinished event for each candidate touches ~30,000
