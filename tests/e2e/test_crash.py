"""A real crash: `payguard serve` is SIGKILLed after Stripe created the intent, before our commit."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.serve import cli_token, free_port, postgres_data_dir, start, stop, wait_ready
from tests.fixtures.stripe import FakeStripe


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with postgres_data_dir() as path:  # as root, PostgreSQL's user cannot enter pytest's tmp_path
        yield path


def test_killed_between_stripe_and_commit_then_retried_creates_one_intent(
    data_dir: Path, stripe: FakeStripe
) -> None:
    port = free_port()
    env = {
        "STRIPE_SECRET_KEY": "sk_test_crash",
        "STRIPE_API_BASE": stripe.url,
        "PAYGUARD_STRIPE_MAX_NETWORK_RETRIES": "0",
        "PAYGUARD_IDEMPOTENCY_LOCK_TIMEOUT_S": "1",
    }
    first = start(data_dir, port, **env)
    wait_ready(port, first)
    headers = {"Authorization": f"Bearer {cli_token(data_dir, '--user', 'u1')}", "Idempotency-Key": "crash-1"}
    url = f"http://127.0.0.1:{port}/v1/credits/purchases"

    def kill_server() -> None:
        stripe.after_create = None
        os.kill(first.pid, signal.SIGKILL)

    stripe.after_create = kill_server
    try:
        httpx.post(url, json={"package_id": "starter"}, headers=headers, timeout=10)
        raise AssertionError("the server answered although it was killed")
    except httpx.TransportError:
        pass  # the connection died with the server
    assert first.wait(timeout=10) == -signal.SIGKILL
    assert len(stripe.intents) == 1  # Stripe's side effect happened; ours never committed

    second = start(data_dir, port, **env)
    try:
        wait_ready(port, second)
        deadline = time.monotonic() + 15
        while True:  # until the dead request's lock times out, the key is in use
            r = httpx.post(url, json={"package_id": "starter"}, headers=headers, timeout=10)
            if r.status_code != 409 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert r.status_code == 201, r.text
        assert r.json()["payment_intent_id"] in stripe.intents
        assert len(stripe.intents) == 1
        assert len(stripe.create_requests) == 2
        assert len({key for key, _ in stripe.create_requests}) == 1  # the same derived Stripe key
        again = httpx.post(url, json={"package_id": "starter"}, headers=headers, timeout=10)
        assert again.content == r.content and again.headers["idempotent-replayed"] == "true"
    finally:
        stop(second, data_dir)
