"""What reaches the logs once `configure_logging` has run, as under `payguard serve`."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from app.observability.logging import configure_logging
from tests.fixtures.app import AppFactory, auth
from tests.fixtures.stripe import FakeStripe

TOUCHED = ("", "stripe", "uvicorn", "uvicorn.error", "uvicorn.access", "alembic.runtime.plugins")


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logs() -> Iterator[list[logging.LogRecord]]:
    """Logging configured at INFO; every record that reaches the root handlers. Restored afterwards."""
    loggers = [logging.getLogger(name) for name in TOUCHED]
    saved = [(lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    configure_logging("INFO")
    keep = Keep()
    logging.getLogger().addHandler(keep)
    yield keep.records
    for lg, (handlers, level, propagate, disabled) in zip(loggers, saved, strict=True):
        lg.handlers[:], lg.level, lg.propagate, lg.disabled = handlers, level, propagate, disabled


async def test_stripe_error_messages_never_reach_the_logs(
    make_client: AppFactory, stripe: FakeStripe, logs: list[logging.LogRecord]
) -> None:
    client = await make_client()
    stripe.failures_to_inject.append(500)
    r = await client.post(
        "/v1/credits/purchases", json={"package_id": "starter"}, headers=auth("u1", key="p1")
    )
    assert r.status_code == 502, r.text
    assert stripe.create_requests, "the request never reached the Stripe double"
    leaked = [
        rec for rec in logs if "injected failure" in rec.getMessage() or "injected failure" in str(vars(rec))
    ]
    assert not leaked, [rec.getMessage() for rec in leaked]
    [ours] = [rec for rec in logs if rec.getMessage() == "stripe create_payment_intent failed"]
    assert ours.levelno == logging.WARNING
    assert ours.__dict__["http_status"] == 500 and "stripe_code" in ours.__dict__
