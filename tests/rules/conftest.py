"""One live stack (payguard, Prometheus, Alertmanager, a Slack receiver) for the tests of this folder."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app.db.embedded import EmbeddedPostgres
from tests.fixtures.alerting import LiveStack, start_stack
from tests.fixtures.smtp import SmtpServer
from tests.fixtures.stripe import FakeStripe

LIVE_DB = "alerts_live"


async def _admin(pg: EmbeddedPostgres, sql: str) -> None:
    conn = await asyncpg.connect(host=pg.socket_dir, user="postgres", database="postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="package")
def live(
    pg: EmbeddedPostgres, template_db: str, smtp_server: SmtpServer, stripe_server: FakeStripe
) -> Iterator[LiveStack]:
    """Started once for the folder; every process and server is stopped at the end, even after a failure."""
    asyncio.run(_admin(pg, f'CREATE DATABASE "{LIVE_DB}" TEMPLATE "{template_db}"'))
    with tempfile.TemporaryDirectory(prefix="payguard-alerts-") as tmp:
        started: list[Any] = []
        try:
            yield start_stack(Path(tmp), pg.url(LIVE_DB), smtp_server, stripe_server, started)
        finally:
            for part in reversed(started):
                part.stop()
            asyncio.run(_admin(pg, f'DROP DATABASE IF EXISTS "{LIVE_DB}" WITH (FORCE)'))
