"""The ticket-hold benchmark's asyncpg baseline is the same work as one HTTP hold (bench/reservations.py).

One hold goes over HTTP; the baseline makes the same hold on a copy of the database taken just before.
Both must send PostgreSQL the same statements, with the same parameters, in the same transactions, in
the same order: with an Idempotency-Key (what the benchmark sends by default) and without (`--no-key`).
The one value that differs between two holds made a moment apart is the hold's `expires_at` inside the
stored answer: it is compared by shape there, and each side's is checked against its own hold's row.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from app.db.embedded import EmbeddedPostgres
from bench.reservations import baseline_hold, baseline_sql
from tests.fixtures.app import AppFactory, auth, create_ticket_type
from tests.fixtures.baseline import Recorder, Sent, connect, recording, twin_database

HOLDER = "bench-holder"

# what a hold leaves behind, as the holder and the operator would look at it
_OUTCOME = """
SELECT (SELECT array_agg(row(id, user_id, ticket_type_id, quantity, status, expires_at - created_at)::text)
          FROM reservations) AS holds,
       (SELECT array_agg(row(key, request_method, request_path, request_fingerprint, request_params,
                             recovery_point, fencing_token, locked_at IS NULL, response_status,
                             response_body::jsonb - 'expires_at')::text)
          FROM idempotency_keys WHERE user_id = $1) AS keys,
       (SELECT bool_and((k.response_body::jsonb ->> 'expires_at')::timestamptz = r.expires_at)
          FROM idempotency_keys k JOIN reservations r ON r.id = (k.response_body::jsonb ->> 'id')::bigint
         WHERE k.user_id = $1) AS answers_match_holds,
       (SELECT array_agg(key) FROM rate_limits) AS rate_buckets,
       (SELECT row(capacity, sold)::text FROM ticket_types WHERE id = $2) AS ticket_type
"""


def _without_expiry(sent: Sent) -> Sent:
    """The statements as sent, with the stored answer's `expires_at` (the clock's) reduced to its shape."""

    def value(v: Any) -> Any:
        if isinstance(v, str) and v.startswith("{") and '"expires_at"' in v:
            body = json.loads(v)
            body["expires_at"] = f"<{len(body['expires_at'])} characters, {body['expires_at'][-1]}>"
            return json.dumps(body)
        return v

    return [s if isinstance(s, str) else (s[0], tuple(value(v) for v in s[1])) for s in sent]


@pytest.mark.parametrize("key", ["bench-0-17", None], ids=["with a key", "without a key"])
async def test_the_baseline_sends_what_a_hold_over_http_sends(
    make_client: AppFactory, pg: EmbeddedPostgres, db_url: str, key: str | None
) -> None:
    client = await make_client()
    services = client.app.state.services
    settings = services.settings
    type_id = await create_ticket_type(client, capacity=10, name="bench")

    # the baseline's database: this one as it is now
    engine = services.sessions.kw["bind"]
    async with twin_database(pg, db_url, engine) as twin:
        with recording(engine) as by_service:
            r = await client.post(
                "/v1/reservations",
                json={"ticket_type_id": type_id, "quantity": 1},
                headers=auth(HOLDER, key=key),
            )
        assert r.status_code == 201, r.text

        baseline = Recorder(await connect(pg, twin))
        try:
            hold = baseline_hold(
                baseline.acquire,
                baseline_sql(),
                rate_limit=settings.rate_reservations,
                window_s=settings.rate_window_s,
                ttl_s=settings.reservation_ttl_s,
            )
            assert await hold(type_id, HOLDER, key) == 201
            after_baseline = await baseline.conn.fetchrow(_OUTCOME, HOLDER, type_id)
        finally:
            await baseline.conn.close()
        await engine.dispose()
        service_db = await connect(pg, make_url(db_url).database or "")
        try:
            after_service = await service_db.fetchrow(_OUTCOME, HOLDER, type_id)
        finally:
            await service_db.close()

    assert _without_expiry(baseline.sent) == _without_expiry(by_service)
    # not two empty lists: the service sent every statement the baseline takes from it (with a key)
    sent_sql = [s[0] for s in by_service if not isinstance(s, str)]
    keyless = {"key insert", "key fence", "key finish"}
    expected = [sql for name, (sql, _) in baseline_sql().items() if key is not None or name not in keyless]
    assert [sql for sql in expected if sql not in sent_sql] == []
    assert len(sent_sql) == len(expected)
    assert dict(after_baseline) == dict(after_service)
    assert after_service["holds"] == [f"(1,{HOLDER},{type_id},1,active,00:15:00)"]
    assert after_service["answers_match_holds"] is (True if key is not None else None)
