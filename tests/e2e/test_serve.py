"""`payguard serve` on the embedded default, as a user runs it: a real process, a real port."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest
from alembic.script import ScriptDirectory

from app.db.embedded import EmbeddedPostgres
from app.db.migrate import alembic_config
from tests.fixtures.serve import PAYGUARD, cli_token, free_port, postgres_data_dir, start, stop, wait_ready


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with postgres_data_dir() as path:  # as root, PostgreSQL's user cannot enter pytest's tmp_path
        yield path


def test_serve_from_an_empty_data_dir_then_restart_with_the_data(data_dir: Path) -> None:
    port = free_port()
    proc = start(data_dir, port)
    try:
        wait_ready(port, proc)
        admin = cli_token(data_dir, "--user", "ops", "--admin")
        user = cli_token(data_dir, "--user", "u1")
        base = f"http://127.0.0.1:{port}"
        r = httpx.post(
            f"{base}/admin/credits/grants",
            json={"user_id": "u1", "credits": 42, "reason": "welcome"},
            headers={"Authorization": f"Bearer {admin}", "Idempotency-Key": "g1"},
        )
        assert r.status_code == 201, r.text
        # payments stay off without a Stripe key, and say so
        r = httpx.post(
            f"{base}/v1/credits/purchases",
            json={"package_id": "starter"},
            headers={"Authorization": f"Bearer {user}", "Idempotency-Key": "p1"},
        )
        assert r.status_code == 503 and r.json()["type"] == "payments-not-configured"
    finally:
        stop(proc, data_dir)
    assert (data_dir / "jwt_secret").stat().st_mode & 0o077 == 0

    proc = start(data_dir, port)
    try:
        wait_ready(port, proc)
        r = httpx.get(
            f"http://127.0.0.1:{port}/v1/credits/balance", headers={"Authorization": f"Bearer {user}"}
        )
        assert r.json() == {"user_id": "u1", "balance": 42}  # same data, same secret
    finally:
        stop(proc, data_dir)


async def test_migrate_applies_the_schema_to_any_url(pg: EmbeddedPostgres) -> None:
    await pg.ensure_database("migrate_cli")
    env = {**os.environ, "DATABASE_URL": pg.url("migrate_cli").replace("+asyncpg", "")}
    subprocess.run([*PAYGUARD, "migrate"], env=env, check=True, capture_output=True, timeout=120)
    conn = await asyncpg.connect(host=pg.socket_dir, user="postgres", database="migrate_cli")
    try:
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables")}
        version = await conn.fetchval("SELECT version_num FROM alembic_version")
    finally:
        await conn.close()
    assert {"idempotency_keys", "credit_ledger", "leads", "outbox_emails", "rate_limits"} <= tables
    assert version == ScriptDirectory.from_config(alembic_config(pg.url("migrate_cli"))).get_current_head()


def test_serve_refuses_clearly_without_a_token_secret_or_a_database(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PAYGUARD_", "DATABASE_URL"))}
    no_secret = subprocess.run(
        [*PAYGUARD, "serve"],
        env={**base, "DATABASE_URL": "postgresql://pg@127.0.0.1:1/x"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_secret.returncode == 2
    assert "PAYGUARD_JWT_SECRET" in no_secret.stderr and "Traceback" not in no_secret.stderr
    no_db = subprocess.run(
        [*PAYGUARD, "serve"],
        env={**base, "DATABASE_URL": "postgresql://pg@127.0.0.1:1/x", "PAYGUARD_JWT_SECRET": "s" * 40},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_db.returncode == 1
    assert "cannot reach the database" in no_db.stderr and "Traceback" not in no_db.stderr


def test_serve_with_two_processes_shares_one_port_one_database_and_one_secret(data_dir: Path) -> None:
    port = free_port()
    proc = start(data_dir, port, processes=2)
    try:
        wait_ready(port, proc)
        admin = cli_token(data_dir, "--user", "ops", "--admin")  # the secret the processes were handed
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as http:
            for n in range(20):  # fresh connections, spread over both processes by the kernel
                r = http.post(
                    "/admin/credits/grants",
                    json={"user_id": "u1", "credits": 1, "reason": "spread"},
                    headers={
                        "Authorization": f"Bearer {admin}",
                        "Idempotency-Key": f"g{n}",
                        "Connection": "close",
                    },
                )
                assert r.status_code == 201, r.text
            user = cli_token(data_dir, "--user", "u1")
            assert (
                http.get("/v1/credits/balance", headers={"Authorization": f"Bearer {user}"}).json()["balance"]
                == 20
            )
        assert len(psutil.Process(proc.pid).children(recursive=True)) >= 2
    finally:
        stop(proc, data_dir)  # SIGTERM stops both processes and then the embedded PostgreSQL
