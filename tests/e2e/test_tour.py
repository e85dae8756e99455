"""The README's webhook tour with real processes: `payguard serve` (worker inside) and `payguard send-test-event`."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.fixtures.app import TEST_SECRET, token
from tests.fixtures.serve import free_port, run, start, stop, wait_ready
from tests.fixtures.stripe import FakeStripe
from tests.fixtures.worker import until

SECRET = "whsec_tour"


@pytest.mark.timeout(180)
async def test_a_signed_event_sent_to_serve_is_credited_by_its_worker(
    db_url: str, db: asyncpg.Connection, stripe: FakeStripe, tmp_path: Path
) -> None:
    env = {
        "DATABASE_URL": db_url.replace("+asyncpg", ""),
        "PAYGUARD_JWT_SECRET": TEST_SECRET,
        "STRIPE_SECRET_KEY": "sk_test_tour",
        "STRIPE_API_BASE": stripe.url,
        "STRIPE_WEBHOOK_SECRETS": f"whsec_older,{SECRET}",
        "PAYGUARD_LOG_LEVEL": "WARNING",
    }
    port = free_port()
    proc: subprocess.Popen[bytes] = start(tmp_path / "serve", port, **env)
    try:
        await asyncio.to_thread(wait_ready, port, proc)
        me = {"Authorization": f"Bearer {token('alice')}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            bought = await http.post(
                "/v1/credits/purchases",
                json={"package_id": "pro"},
                headers={**me, "Idempotency-Key": "buy-pro"},
            )
            assert bought.status_code == 201, bought.text
            intent = bought.json()["payment_intent_id"]
            sent = await asyncio.to_thread(
                run,
                None,
                "send-test-event",
                "--url",
                f"http://127.0.0.1:{port}",
                "--intent",
                intent,
                "--amount",
                "4500",
                STRIPE_WEBHOOK_SECRETS=SECRET,
            )
            assert sent.returncode == 0, sent.stderr
            assert sent.stdout.startswith('200 {"received":true,"duplicate":false}'), sent.stdout
            await until(db, "SELECT count(*) = 1 FROM credit_ledger WHERE user_id = 'alice'", timeout_s=60)
            assert (await http.get("/v1/credits/balance", headers=me)).json()["balance"] == 500
            state = await http.get(f"/v1/credits/purchases/{bought.json()['purchase_id']}", headers=me)
            assert state.json()["status"] == "succeeded"
    finally:
        if proc.poll() is None:
            stop(proc, tmp_path / "serve")
