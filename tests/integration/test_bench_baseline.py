"""The benchmark's asyncpg baseline is the same work as one HTTP lead purchase (bench/lead_purchase.py).

"HTTP against the same SQL through asyncpg" only means something while the SQL is the same. One
purchase goes over HTTP; the baseline makes the same purchase on a copy of the database taken just
before. Both must send PostgreSQL the same statements, with the same parameters, in the same
transactions, in the same order. Both sides are in the `$n` form SQLAlchemy's asyncpg dialect sends
(the baseline compiles the service's statements with it), so the text is compared as it is: a
different lock clause, column list or literal shows up as a text difference.
"""

from __future__ import annotations

from sqlalchemy.engine import make_url

from app.db.embedded import EmbeddedPostgres
from bench.lead_purchase import baseline_purchase, baseline_sql
from tests.fixtures.app import AppFactory, auth, create_lead, grant
from tests.fixtures.baseline import Recorder, connect, recording, twin_database

BUYER = "bench-buyer"

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


async def test_the_baseline_sends_what_a_purchase_over_http_sends(
    make_client: AppFactory, pg: EmbeddedPostgres, db_url: str
) -> None:
    client = await make_client()
    services = client.app.state.services
    settings = services.settings
    await grant(client, BUYER, 100)
    lead_id = await create_lead(client, price=10, title="bench lead")

    # the baseline's database: this one as it is now
    engine = services.sessions.kw["bind"]
    async with twin_database(pg, db_url, engine) as twin:
        with recording(engine) as by_service:
            r = await client.post(
                f"/v1/leads/{lead_id}/purchase", headers=auth(BUYER, key=f"bench-{lead_id}")
            )
        assert r.status_code == 201, r.text

        baseline = Recorder(await connect(pg, twin))
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
        service_db = await connect(pg, make_url(db_url).database or "")
        try:
            after_service = await service_db.fetchrow(_OUTCOME, lead_id, BUYER)
        finally:
            await service_db.close()

    assert baseline.sent == by_service
    # not two empty lists: the service sent every statement the baseline takes from it
    sent_sql = [s[0] for s in by_service if not isinstance(s, str)]
    assert [sql for sql, _ in baseline_sql().values() if sql not in sent_sql] == []
    assert dict(after_baseline) == dict(after_service)
    assert after_service["lead"] == f"(sold,{BUYER})" and after_service["balance"] == 90
