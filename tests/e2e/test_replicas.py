"""Two `payguard serve` processes on one database, as two replicas behind a load balancer.

The rate limit lives in PostgreSQL, so it holds across processes: a limiter kept in process
memory would let each replica admit its own 20. And a request over the limit must move nothing:
a limit checked after the purchase commits would answer the right statuses over the wrong state.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.leads.models import LeadStatus
from app.notifications.service import EmailKind
from tests.fixtures.app import ADMIN, PATIENT_DB, TEST_SECRET, token
from tests.fixtures.serve import free_port, start, stop, wait_ready

LIMIT = 20
LEADS = 100
PRICE = 5
FUNDS = 1_000


@pytest.mark.timeout(240)
async def test_rate_limit_is_shared_by_two_serve_processes(
    db_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    env = {
        "DATABASE_URL": db_url.replace("+asyncpg", ""),
        "PAYGUARD_JWT_SECRET": TEST_SECRET,  # one secret: a token works on either replica
        "PAYGUARD_RATE_LEAD_PURCHASES": str(LIMIT),
        # a window of an hour: no request in this test is admitted by the window moving on
        "PAYGUARD_RATE_WINDOW_S": "3600",
        "PAYGUARD_LOG_LEVEL": "WARNING",
        **{f"PAYGUARD_{name.upper()}": str(value) for name, value in PATIENT_DB.items()},
    }
    ports = [free_port(), free_port()]
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for n, port in enumerate(ports):
            procs.append((start(tmp_path / f"replica-{n}", port, **env), tmp_path / f"replica-{n}"))
        for port, (proc, _) in zip(ports, procs, strict=True):
            await asyncio.to_thread(wait_ready, port, proc)
        await _buy_through_both(ports, db)
    finally:
        for proc, data_dir in procs:
            if proc.poll() is None:
                stop(proc, data_dir)


async def _buy_through_both(ports: list[int], db: asyncpg.Connection) -> None:
    admin = {"Authorization": f"Bearer {token(ADMIN, admin=True)}"}
    user = {"Authorization": f"Bearer {token('u1')}"}
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(
            f"{bases[0]}/admin/credits/grants",
            json={"user_id": "u1", "credits": FUNDS, "reason": "replica test"},
            headers={**admin, "Idempotency-Key": "fund-u1"},
        )
        assert r.status_code == 201, r.text
        created = await asyncio.gather(
            *(
                http.post(
                    f"{bases[i % 2]}/admin/leads",
                    json={"title": f"lead {i}", "price_credits": PRICE, "details": {"n": i}},
                    headers=admin,
                )
                for i in range(LEADS)
            )
        )
        assert all(r.status_code == 201 for r in created), [r.text for r in created if r.status_code != 201]
        leads = [r.json()["id"] for r in created]

        responses = await asyncio.gather(
            *(
                http.post(
                    f"{bases[i % 2]}/v1/leads/{lead}/purchase",
                    headers={**user, "Idempotency-Key": f"buy-{lead}"},
                )
                for i, lead in enumerate(leads)
            )
        )

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: LIMIT, 429: LEADS - LIMIT}, statuses
    assert all(r.json()["type"] == "rate-limited" for r in responses if r.status_code == 429)
    bought = {lead for lead, r in zip(leads, responses, strict=True) if r.status_code == 201}
    refused = set(leads) - bought

    sold = await db.fetch("SELECT id, buyer_id FROM leads WHERE status = $1", LeadStatus.SOLD)
    assert {r["id"] for r in sold} == bought and {r["buyer_id"] for r in sold} == {"u1"}
    assert (
        await db.fetchval("SELECT balance FROM credit_accounts WHERE user_id = 'u1'") == FUNDS - LIMIT * PRICE
    )
    debits = await db.fetch("SELECT reference FROM credit_ledger WHERE user_id = 'u1' AND delta < 0")
    assert sorted(r["reference"] for r in debits) == sorted(f"lead_purchase:{lead}" for lead in bought)
    purchases = await db.fetch("SELECT lead_id FROM lead_purchases WHERE user_id = 'u1'")
    assert {r["lead_id"] for r in purchases} == bought and len(purchases) == LIMIT
    emails = await db.fetch("SELECT payload FROM outbox_emails WHERE kind = $1", EmailKind.LEAD_PURCHASED)
    assert sorted(json.loads(e["payload"])["lead_id"] for e in emails) == sorted(bought)
    # the 429s moved nothing: their leads are still for sale, and no answer was stored for their keys
    assert refused == {
        r["id"] for r in await db.fetch("SELECT id FROM leads WHERE status = $1", LeadStatus.AVAILABLE)
    }
    assert (
        await db.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE key = ANY($1::text[]) AND response_status IS NOT NULL",
            [f"buy-{lead}" for lead in refused],
        )
        == 0
    )
