"""One embedded PostgreSQL per session; each test gets a fresh database cloned from a migrated template."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from app.config import Settings, load_settings
from app.db.embedded import EmbeddedPostgres
from app.db.migrate import upgrade
from app.main import create_app
from tests.fixtures.app import TEST_SECRET, AppFactory, Client, close_client, connect
from tests.fixtures.serve import postgres_data_dir
from tests.fixtures.smtp import SmtpServer
from tests.fixtures.stripe import FakeStripe, start_fake_stripe
from tests.fixtures.webhooks import WEBHOOK_SECRET

TEMPLATE = "payguard_template"
_db_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def pg() -> Iterator[EmbeddedPostgres]:
    with postgres_data_dir() as data_dir:  # as root, PostgreSQL's user cannot enter pytest's tmp_path
        server = EmbeddedPostgres(data_dir)
        yield server
        server.close()


@pytest.fixture(scope="session")
def template_db(pg: EmbeddedPostgres) -> str:
    import asyncio

    asyncio.run(pg.ensure_database(TEMPLATE))
    upgrade(pg.url(TEMPLATE))
    return TEMPLATE


async def _admin(pg: EmbeddedPostgres) -> asyncpg.Connection:
    return await asyncpg.connect(host=pg.socket_dir, user="postgres", database="postgres")


@pytest.fixture
async def new_database(pg: EmbeddedPostgres, template_db: str) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Make fresh migrated databases on the session's server; all are dropped after the test."""
    made: list[str] = []

    async def make() -> str:
        name = f"test_{next(_db_numbers)}"
        conn = await _admin(pg)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        finally:
            await conn.close()
        made.append(name)
        return pg.url(name)

    yield make
    conn = await _admin(pg)
    try:
        for name in made:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def db_url(new_database: Callable[[], Awaitable[str]]) -> str:
    return await new_database()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test's database, for asserting on rows."""
    conn = await connect(db_url)
    yield conn
    await conn.close()


@pytest.fixture(scope="session")
def stripe_server() -> Iterator[FakeStripe]:
    fake, server = start_fake_stripe()
    yield fake
    server.shutdown()


@pytest.fixture
def stripe(stripe_server: FakeStripe) -> FakeStripe:
    stripe_server.reset()
    return stripe_server


@pytest.fixture
def settings_for(db_url: str, stripe: FakeStripe) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": db_url,
            "jwt_secret": TEST_SECRET,
            "stripe_secret_key": "sk_test_payguard",
            "stripe_api_base": stripe.url,
            "stripe_max_network_retries": 0,
            "stripe_webhook_secrets": (WEBHOOK_SECRET,),
            "run_worker": False,  # tests that want the worker run it themselves
            "run_jobs": False,  # and the jobs
            "log_level": "WARNING",
        }
        values.update(overrides)
        return load_settings({}, **values)

    return build


@pytest.fixture
async def make_client(settings_for: Callable[..., Settings], db_url: str) -> AsyncIterator[AppFactory]:
    """Build the app with setting overrides and open an in-process client on it."""
    opened: list[Client] = []

    async def build(**overrides: Any) -> Client:
        client = Client(create_app(settings_for(**overrides), db_url))
        opened.append(client)
        return client

    yield build
    for client in opened:
        await close_client(client)


@pytest.fixture
async def client(make_client: AppFactory) -> Client:
    return await make_client()


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def smtp(smtp_server: SmtpServer) -> SmtpServer:
    """The session's SMTP server, up, accepting everything and with nothing received yet."""
    smtp_server.reset()
    return smtp_server
