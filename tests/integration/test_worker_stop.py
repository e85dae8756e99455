"""A worker stopped long before its engine is disposed leaves every pooled connection closable."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from app.config import Settings
from app.main import create_app
from tests.fixtures.app import Client, close_client
from tests.fixtures.worker import running_worker


async def test_the_engine_closes_after_a_stopped_worker_idled_past_the_statement_timeout(
    settings_for: Callable[..., Settings], db_url: str
) -> None:
    # the stop races the listener's UNLISTEN (a cancel there hung dispose): several rounds, each
    # idling past a short statement_timeout before the app shuts down as `serve` does
    for _ in range(8):
        client = Client(create_app(settings_for(db_statement_timeout_ms=200), db_url))
        try:
            async with running_worker(client):
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.4)
        finally:
            await asyncio.wait_for(close_client(client), 10)
