"""`payguard serve` on the embedded default, as a user runs it: a real process, a real port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import psutil

from app.db.embedded import EmbeddedPostgres

PAYGUARD = [sys.executable, "-c", "from app.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(data_dir: Path, port: int, **extra_env: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYGUARD_", "DATABASE_URL", "STRIPE_"))}
    env["PAYGUARD_DATA_DIR"] = str(data_dir)
    env.update(extra_env)
    return subprocess.Popen([*PAYGUARD, "serve", "--port", str(port)], env=env, stderr=subprocess.PIPE)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("payguard serve never became ready")


def cli_token(data_dir: Path, *args: str) -> str:
    env = {**os.environ, "PAYGUARD_DATA_DIR": str(data_dir)}
    env.pop("PAYGUARD_JWT_SECRET", None)
    return subprocess.check_output([*PAYGUARD, "token", *args], env=env, text=True).strip()


def postgres_running(data_dir: Path) -> bool:
    return any(
        p.info["name"] == "postgres" and str(data_dir / "pgdata") in " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["name", "cmdline"])
    )


def stop(proc: subprocess.Popen[bytes], data_dir: Path) -> None:
    """SIGTERM, as Kubernetes sends it; the embedded PostgreSQL must stop with the service."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while postgres_running(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not postgres_running(data_dir), "SIGTERM must stop the embedded PostgreSQL"


def test_serve_from_an_empty_data_dir_then_restart_with_the_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "payguard-data"
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
    assert version == "0001"


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
