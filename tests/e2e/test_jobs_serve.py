"""The jobs on the embedded default: inside `payguard serve` on their schedule, and `payguard jobs`
next to it on the same data directory, using the server that `serve` runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.serve import (
    assert_usage_error,
    cli_token,
    free_port,
    postgres_data_dir,
    postgres_running,
    run,
    start,
    stop,
    wait_ready,
    wait_until,
)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with postgres_data_dir() as path:
        yield path


def test_serve_runs_the_jobs_and_payguard_jobs_next_to_it_uses_its_server(data_dir: Path) -> None:
    port = free_port()
    proc = start(data_dir, port)
    try:
        wait_ready(port, proc)
        base = f"http://127.0.0.1:{port}"
        admin = {"Authorization": f"Bearer {cli_token(data_dir, '--user', 'ops', '--admin')}"}

        def jobs_run_by_serve() -> set[str]:
            items = httpx.get(f"{base}/admin/jobs/runs", headers=admin).json()["items"]
            return {r["job"] for r in items if r["outcome"] == "succeeded"}

        # never run on this database: due at once; reconcile is not scheduled without a Stripe key
        assert wait_until(lambda: jobs_run_by_serve() == {"cleanup", "health"}, 60), jobs_run_by_serve()

        result = run(data_dir, "jobs", "cleanup")
        assert result.returncode == 0, result.stderr
        record = json.loads(result.stdout)
        assert record["job"] == "cleanup" and record["outcome"] == "succeeded"
        listed = httpx.get(f"{base}/admin/jobs/runs", params={"job": "cleanup"}, headers=admin).json()
        assert listed["items"][0]["id"] == record["id"]  # the same database: serve's server
        metrics = httpx.get(f"{base}/metrics").text
        assert 'payguard_job_last_success_timestamp_seconds{job="cleanup"}' in metrics
        assert 'payguard_job_last_success_timestamp_seconds{job="health"}' in metrics
        health = httpx.get(f"{base}/admin/operations-health", headers=admin).json()
        assert {m["metric"] for m in health["metrics"]} == {"purchases", "webhooks", "emails"}
        # the job left serve's PostgreSQL running when it exited
        assert postgres_running(data_dir) and proc.poll() is None
        assert httpx.get(f"{base}/health/ready").status_code == 200

        assert_usage_error(run(data_dir, "jobs", "reconcile"), "STRIPE_SECRET_KEY")
        assert_usage_error(run(data_dir, "jobs", "vacuum"), "invalid choice")
    finally:
        stop(proc, data_dir)
