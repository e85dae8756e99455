"""The embedded PostgreSQL: stopped with payguard whenever payguard is stopped."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.fixtures.serve import free_port, kill_postgres, postgres_running, run, start, wait_until

EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 130}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("signum", "moment", "delay_s"),
    [
        (signal.SIGTERM, "initdb", 0.0),  # pgdata exists, the server does not yet
        (signal.SIGTERM, "postgres", 0.0),  # the server runs, pg_ctl is still waiting for it
        (signal.SIGTERM, "postgres", 0.3),  # creating the database, migrating
        (signal.SIGTERM, "postgres", 1.0),  # building the app, starting uvicorn
        (signal.SIGINT, "postgres", 0.0),
        (signal.SIGINT, "postgres", 0.3),
        (signal.SIGTERM, "restart", 0.0),  # pgdata initialised by an earlier run: no initdb
        (signal.SIGINT, "terminal", 0.0),  # Ctrl-C reaches pg_ctl too, which dies; the server lives on
    ],
    ids=[
        "term-initdb",
        "term-started",
        "term-migrating",
        "term-app",
        "int-started",
        "int-migrating",
        "term-restart",
        "int-terminal",
    ],
)
def test_a_stop_during_start_up_stops_the_postgres_it_started(
    tmp_path: Path, signum: signal.Signals, moment: str, delay_s: float
) -> None:
    data_dir = tmp_path / "data"
    if moment == "restart":
        assert run(data_dir, "migrate").returncode == 0
    proc = start(data_dir, free_port(), own_group=moment == "terminal")
    try:
        if moment == "initdb":
            reached = wait_until(lambda: (data_dir / "pgdata").exists(), timeout=60)
        else:
            reached = wait_until(lambda: postgres_running(data_dir), timeout=60)
        assert reached and proc.poll() is None, "start-up never reached the moment to stop it"
        if delay_s:
            wait_until(lambda: False, timeout=delay_s)
        if moment == "terminal":
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        try:
            status = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("payguard did not exit after the signal")
        assert status == EXIT_STATUS[signum]
        assert wait_until(lambda: not postgres_running(data_dir), timeout=5), "PostgreSQL was left running"
    finally:
        proc.kill()
        proc.wait()
        kill_postgres(data_dir)


@pytest.mark.timeout(120)
def test_a_start_that_fails_after_the_server_came_up_stops_it(tmp_path: Path) -> None:
    # pg_ctl dies while it waits for the server it launched (the wheel kills it after 10 s on a slow
    # machine): the server runs, yet no process was recorded as holding it
    data_dir = tmp_path / "data"
    proc = start(data_dir, free_port())
    pg_ctl: list[psutil.Process] = []

    def server_launched() -> bool:
        # postmaster.pid appears as the server starts, before pg_ctl sees it ready (it looks every 0.1 s)
        try:
            pg_ctl[:] = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == "pg_ctl"]
        except psutil.NoSuchProcess:  # a child (initdb, a shell) exited while we looked
            return False
        return bool(pg_ctl) and (data_dir / "pgdata" / "postmaster.pid").exists()

    try:
        assert wait_until(server_launched, timeout=60, interval=0.005)
        try:
            for child in pg_ctl:
                child.kill()
        except psutil.NoSuchProcess:
            pytest.skip("pg_ctl had already seen the server ready: nothing to interrupt this time")
        try:
            status = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("payguard did not give up after pg_ctl failed")
        assert status != 0
        assert wait_until(lambda: not postgres_running(data_dir), timeout=5), "PostgreSQL was left running"
    finally:
        proc.kill()
        proc.wait()
        kill_postgres(data_dir)
