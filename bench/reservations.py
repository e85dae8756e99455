"""Ticket-hold benchmark (issue 11): holds per second and p99 on one hot ticket type and on 100 types.

The real service over HTTP against the same SQL issued through asyncpg, in the same run. One run, no
arguments needed:

1. a private embedded PostgreSQL in a temp dir, migrated to head;
2. `payguard serve` as a subprocess on 127.0.0.1 (`PAYGUARD_RUN_WORKER=false`, the reservations rate
   limit set out of the way; its upsert still runs on every hold);
3. two cases, each with fresh ticket types for every phase (capacity 10^9: nothing sells out):
   **hot**, every hold on one ticket type, and **100 types**, each hold on one picked at random;
4. per case, HTTP, closed loop: 64 clients on keep-alive connections, each `POST /v1/reservations
   {ticket_type_id, quantity: 1}` with a bearer token (64 users per side) and a fresh Idempotency-Key
   -> peak holds/s, p50/p99; HTTP, open loop at half that peak -> p99 from the scheduled arrival;
5. per case, the baseline: the same transactions as `hold_tickets` (key insert, rate-limit upsert, the
   fenced hold: key fence, `_LOCK_TYPE`, `_HOLD`, key finish), statement for statement (the service's
   own statements compiled as SQLAlchemy sends them), through an asyncpg pool of 64; closed loop with
   64 workers, then open loop at the HTTP open loop's rate;
6. the figures side by side with the ratios (HTTP / asyncpg, and hot / 100 types), then SQL checks:
   no ticket type over capacity, and each phase's hold rows == its 201 answers.

With `--no-key` both sides hold without an Idempotency-Key (no key insert, no fence, no stored answer).

What bounds the hot case: holds of one type queue on its row lock, so holds/s there is 1 / (time the
lock is held per hold). Each phase samples PostgreSQL (every 20 ms, `--probe-interval-ms`): is a hold
waiting for a ticket type's lock, and what is the backend holding it doing: waiting for its client's
next statement (`app after <statement>`), running `_HOLD` (which sums the type's live holds), or
committing (flushing WAL). Lock held per hold ~= (fraction of samples with a waiter) / holds per second;
the baseline also measures it directly (from `_LOCK_TYPE`'s answer to COMMIT's). `_HOLD` reads every
live hold of its type, so its cost grows with them: `--live-holds N` starts each phase with N live holds
on the hot type (N / 100 on each of the 100 types), as a hot type has after minutes of sales.

The load generators reuse bench/lead_purchase.py's (this file with a hidden `--worker` option: its own
process, uvloop, a minimal HTTP/1.1 client), as do the CPU columns: `app ms` and `pg ms` are CPU ms per
hold of the application (the server; for the baseline, the asyncpg client) and of PostgreSQL; the
cores columns split the machine between server, PostgreSQL, load generator and `other` (anything else
running on the machine: when it is not near 0 the figures are disturbed).

    .venv/bin/python bench/reservations.py [--duration 15] [--no-key] [--live-holds N] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

try:  # run as a script (bench/ is on sys.path) or imported as bench.reservations
    from lead_purchase import (
        DATABASE,
        RATE_WINDOW_S,
        SECRET,
        BaselineSql,
        HttpClients,
        _non201,
        _print_phase,
        _ratio,
        _Reject,
        _sql,
        _start_servers,
        _Statement,
        _stop_servers,
        _tail,
        baseline_pool,
        bearer_tokens,
        compile_statements,
        run_load,
        run_worker,
        worker_main,
    )
except ModuleNotFoundError:
    from bench.lead_purchase import (
        DATABASE,
        RATE_WINDOW_S,
        SECRET,
        BaselineSql,
        HttpClients,
        _non201,
        _print_phase,
        _ratio,
        _Reject,
        _sql,
        _start_servers,
        _Statement,
        _stop_servers,
        _tail,
        baseline_pool,
        bearer_tokens,
        compile_statements,
        run_load,
        run_worker,
        worker_main,
    )

PATH = "/v1/reservations"
QUANTITY = 1
CAPACITY = 10**9  # ticket_types.capacity is an integer; no run comes near it
SPREAD_TYPES = 100
RATE_LIMIT = 10**9  # PAYGUARD_RATE_RESERVATIONS: far above anything the bench can reach
HTTP_USERS, SQL_USERS = "bench-http-", "bench-sql-"  # user ids: the prefix and a number
LIVE_USER = "bench-live"  # the holds --live-holds seeds before a phase

# ---------------------------------------------------------------------------------------------------------
# The baseline: the statements `hold_tickets` sends, in the same order and transactions, compiled from the
# service modules' own statements as bench/lead_purchase.py compiles its own (the same text, $n placeholders
# and bind casts). tests/integration/test_bench_baseline.py holds once each way and compares what reached
# PostgreSQL, statement for statement and transaction for transaction, with a key and without.
# ---------------------------------------------------------------------------------------------------------


def baseline_sql() -> BaselineSql:
    """The SQL of each statement a hold sends, compiled from the service modules' statements."""
    from app.idempotency import service as keys
    from app.ratelimit import service as ratelimit
    from app.reservations import service as reservations

    return compile_statements(
        {
            "key insert": keys._INSERT_KEY,  # idempotency._acquire: its own transaction (with a key)
            "rate-limit upsert": ratelimit._ADMIT,  # ratelimit.hit: its own transaction
            "key fence": keys._FENCE,  # idempotency.step: the hold's transaction from here (with a key)
            "type lock": reservations._LOCK_TYPE,  # holds of one type queue here
            "hold": reservations._HOLD,
            "key finish": keys._FINISH,  # Step.finish (with a key)
        }
    )


def baseline_hold(
    acquire: Callable[[], Any],
    sql: BaselineSql,
    *,
    rate_limit: int,
    window_s: int,
    ttl_s: int,
    lock_held: list[tuple[float, float]] | None = None,
) -> Callable[[int, str, str | None], Awaitable[int]]:
    """`hold(ticket_type_id, user, idempotency_key or None) -> status`: one hold of QUANTITY ticket as
    `hold_tickets` makes it, through asyncpg.

    `acquire()` opens a connection (an asyncpg pool's `acquire`); `sql` comes from `baseline_sql()`; the
    settings are the service's (rate limit and window, hold TTL). `lock_held`, if given, gets
    (when the type's lock was granted, seconds until COMMIT answered) per hold, in perf_counter time.
    A rejection is only its status here (the bench's checks fail on any).
    """
    import msgspec

    from app.idempotency.service import RecoveryPoint
    from app.ratelimit.service import RateAction
    from app.reservations.models import ReservationStatus
    from app.reservations.schemas import HoldCreate, ReservationOut

    def statement(name: str) -> _Statement:
        return _Statement(name, *sql[name])

    key_insert, rate_admit, key_fence = (
        statement("key insert"),
        statement("rate-limit upsert"),
        statement("key fence"),
    )
    type_lock, hold_insert, key_finish = statement("type lock"), statement("hold"), statement("key finish")
    interval = window_s / rate_limit

    async def hold(type_id: int, user: str, key: str | None) -> int:
        key_id: int | None = None
        if key is not None:
            body = msgspec.json.encode(HoldCreate(type_id, QUANTITY))  # the decoded body, as keyed() has it
            fingerprint = hashlib.sha256(b"\n".join([b"POST", PATH.encode(), body])).hexdigest()
            async with acquire() as c, c.transaction():
                key_id = await c.fetchval(
                    *key_insert(
                        user_id=user,
                        key=key,
                        method="POST",
                        path=PATH,
                        fingerprint=fingerprint,
                        params=json.dumps({"ticket_type_id": type_id, "quantity": QUANTITY}),
                        point=RecoveryPoint.STARTED,
                    )
                )
            if key_id is None:
                return 409
        async with acquire() as c, c.transaction():
            admitted = await c.fetchval(
                *rate_admit(key=f"{RateAction.RESERVATION}:{user}", interval=interval, window=window_s)
            )
        if admitted is None:
            return 429
        try:
            async with acquire() as c:
                async with c.transaction():
                    if key_id is not None and await c.fetchval(*key_fence(key_id=key_id, token=1)) is None:
                        raise _Reject(409)
                    if await c.fetchval(*type_lock(type_id=type_id)) is None:
                        raise _Reject(404)
                    locked = time.perf_counter()
                    held = await c.fetchrow(
                        *hold_insert(
                            user_id=user,
                            type_id=type_id,
                            quantity=QUANTITY,
                            ttl_s=ttl_s,
                        )
                    )
                    if held is None:
                        raise _Reject(409)  # sold out
                    if key_id is not None:
                        out = ReservationOut(
                            held["id"], ReservationStatus.ACTIVE, type_id, QUANTITY, held["expires_at"]
                        )
                        await c.execute(
                            *key_finish(
                                status=201,
                                body=msgspec.json.encode(out).decode(),
                                point=RecoveryPoint.FINISHED,
                                key_id=key_id,
                            )
                        )
                if lock_held is not None:
                    lock_held.append((locked, time.perf_counter() - locked))
        except _Reject as rejected:
            return rejected.status
        return 201

    return hold


# ---------------------------------------------------------------------------------------------------------
# Load generator (its own process: `reservations.py --worker '<json spec>'`), on lead_purchase's run_load
# ---------------------------------------------------------------------------------------------------------

# a hold waiting for a ticket type's row waits for its holder's transaction id ('transactionid'; the
# holds queued behind it wait for the tuple lock): the first such waiter shows who holds the lock
_LOCK_HOLDER = """
WITH waiting AS (
    SELECT pid, wait_event FROM pg_stat_activity
     WHERE datname = current_database() AND wait_event_type = 'Lock'
)
SELECT (SELECT count(*) FROM waiting) AS waiting, h.state, h.wait_event, h.query
  FROM (SELECT 1) AS one
  LEFT JOIN pg_stat_activity h
    ON h.pid = (SELECT (pg_blocking_pids(pid))[1] FROM waiting WHERE wait_event = 'transactionid' LIMIT 1)
"""


def _holder_doing(state: str | None, wait_event: str | None, query: str | None, names: dict[str, str]) -> str:
    """What the backend holding a ticket type's lock is doing, in the words of the hold's statements."""
    if state is None:  # the lock is changing hands: the next hold has it, no other waits on it yet
        return "handover"
    sql = (query or "").strip().rstrip(";").strip()
    name = "COMMIT" if sql.upper() == "COMMIT" else names.get(sql, "other statement")
    if state == "idle in transaction":
        return f"app after {name}"  # the statement is done: the backend waits for its client's next one
    if state == "active" and wait_event == "ClientRead":
        return f"app sending {name}"  # the statement's messages are not all there yet
    if state == "active":
        return f"{name} running" + (f" ({wait_event})" if wait_event else "")
    return state


async def _lock_probe(spec: dict[str, Any], start: float, end: float) -> dict[str, Any]:
    """Sample, every probe_interval, whether a hold waits for a lock and what its holder is doing."""
    import asyncpg

    names = {sql.strip(): name for name, (sql, _) in spec["statements"].items()}
    conn = await asyncpg.connect(host=spec["socket_dir"], user="postgres", database=spec["database"])
    doing: Counter[str] = Counter()
    samples = waiting = 0
    try:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        due = time.perf_counter()
        while due < end:
            row = await conn.fetchrow(_LOCK_HOLDER)
            samples += 1
            waiting += row["waiting"]
            if row["waiting"]:
                doing[_holder_doing(row["state"], row["wait_event"], row["query"], names)] += 1
            else:
                doing["no hold waiting"] += 1
            due += spec["probe_interval"]
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
    finally:
        await conn.close()
    return {"samples": samples, "mean_waiting": waiting / max(1, samples), "doing": dict(doing.most_common())}


async def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    type_ids: list[int] = spec["type_ids"]
    rng = random.Random(spec["label"])

    def take() -> int:
        return type_ids[0] if len(type_ids) == 1 else rng.choice(type_ids)

    numbers = itertools.count()

    def next_key() -> str | None:
        return f"{spec['key_prefix']}-{next(numbers)}" if spec["keyed"] else None

    samples: list[str] = []
    lock_held: list[tuple[float, float]] = []
    slots: list[Any]
    close: Callable[[], Awaitable[None]]
    if spec["kind"] == "http":
        tokens = bearer_tokens(spec["users"], spec["secret"])
        http = HttpClients(spec["ports"], samples)
        await http.open(spec["clients"])
        slots, close = http.slots, http.close

        async def call(slot: Any, type_id: int, user: str) -> int:
            body = b'{"ticket_type_id":%d,"quantity":%d}' % (type_id, QUANTITY)
            key = next_key()
            key_header = "" if key is None else f"Idempotency-Key: {key}\r\n"

            def request(port: int) -> bytes:
                return (
                    f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Authorization: Bearer {tokens[user]}\r\n{key_header}"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body

            return await http.send(slot, request)

    else:
        pool = await baseline_pool(spec)
        slots, close = [None] * spec["clients"], pool.close
        hold = baseline_hold(
            pool.acquire,
            spec["statements"],
            rate_limit=spec["rate_limit"],
            window_s=RATE_WINDOW_S,
            ttl_s=spec["ttl_s"],
            lock_held=lock_held,
        )

        async def call(slot: Any, type_id: int, user: str) -> int:
            try:
                return await hold(type_id, user, next_key())
            except Exception as exc:
                if len(samples) < 5:
                    samples.append(f"{type(exc).__name__}: {exc}")
                return 0

    async def probe(start: float, end: float) -> dict[str, Any]:
        return await _lock_probe(spec, start, end)

    try:
        result = await run_load(spec, slots, take, call, probe if spec["probe_interval"] > 0 else None)
    finally:
        await close()
    start, end = result["window"]
    held = sorted(dt for at, dt in lock_held if start <= at < end)
    if held:
        result["lock_held_ms"] = {
            "mean": 1e3 * sum(held) / len(held),
            "p50": 1e3 * held[len(held) // 2],
            "p99": 1e3 * held[min(len(held) - 1, math.ceil(0.99 * len(held)) - 1)],
        }
    return result | {"samples": samples}


# ---------------------------------------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------------------------------------


async def _new_types(conn: Any, count: int, live_holds: int, ttl_s: int) -> list[int]:
    """`count` fresh ticket types, each with `live_holds` unexpired holds by LIVE_USER already on it."""
    rows = await conn.fetch(
        "INSERT INTO ticket_types (name, capacity, sold, price, currency)"
        " SELECT 'bench ' || g, $1::integer, 0, 2500, 'usd' FROM generate_series(1, $2::int) g RETURNING id",
        CAPACITY,
        count,
    )
    ids = sorted(int(r["id"]) for r in rows)
    if live_holds:
        await conn.execute(
            "INSERT INTO reservations (user_id, ticket_type_id, quantity, status, expires_at)"
            " SELECT $1, t, 1, 'active', now() + make_interval(secs => $4::double precision)"
            "   FROM unnest($2::bigint[]) t, generate_series(1, $3::int)",
            LIVE_USER,
            ids,
            live_holds,
            ttl_s,
        )
    await conn.execute("VACUUM ANALYZE ticket_types, reservations")  # each phase starts from a settled table
    return ids


async def _count_cost(conn: Any, type_id: int) -> tuple[int, float]:
    """The live holds on a type, and how long `_HOLD`'s count of them takes now (median of 5, from here)."""
    from app.reservations import service as reservations

    live = await conn.fetchval(
        "SELECT count(*) FROM reservations WHERE ticket_type_id = $1 AND status = 'active'"
        " AND expires_at > now()",
        type_id,
    )
    count = await conn.prepare("SELECT " + reservations._HELD.replace(":type_id", "$1"))
    times = []
    for _ in range(6):
        started = time.perf_counter()
        await count.fetchval(type_id)
        times.append(time.perf_counter() - started)
    return int(live), 1e3 * sorted(times[1:])[2]  # the first run warms the cache


async def _verify(conn: Any, phases: list[dict[str, Any]]) -> dict[str, Any]:
    over = await conn.fetchval(
        """
        SELECT count(*) FROM ticket_types t
         WHERE t.sold + (SELECT coalesce(sum(r.quantity), 0) FROM reservations r WHERE r.ticket_type_id = t.id
                          AND r.status = 'active' AND r.expires_at > now()) > t.capacity
        """
    )
    rows = []
    for r in phases:
        users = (HTTP_USERS if r["kind"] == "http" else SQL_USERS) + "%"
        n = await conn.fetchval(
            "SELECT count(*) FROM reservations WHERE ticket_type_id = ANY($1::bigint[]) AND user_id LIKE $2",
            r["type_ids"],
            users,
        )
        rows.append(int(n))
    keys_201 = await conn.fetchval("SELECT count(*) FROM idempotency_keys WHERE response_status = 201")
    keys_all = await conn.fetchval("SELECT count(*) FROM idempotency_keys")
    return {"over_capacity": int(over), "rows": rows, "keys_201": int(keys_201), "keys": int(keys_all)}


def holder_shares(doing: dict[str, int]) -> dict[str, dict[str, int]]:
    """The probe's samples of the lock holder grouped: the app's turn (after or sending which statement),
    `_HOLD` running, COMMIT (mostly the WAL flush), the lock changing hands, other statements running."""
    groups: dict[str, dict[str, int]] = {}
    for what, n in doing.items():
        if what == "no hold waiting":
            continue
        if what.startswith("app "):
            group, detail = "app's turn", what.removeprefix("app ")
        elif what.startswith("hold running"):
            group, detail = "_HOLD running", what
        elif what.startswith("COMMIT"):
            group, detail = "COMMIT", what
        else:
            group, detail = ("handover", what) if what == "handover" else ("other statements", what)
        groups.setdefault(group, {})
        groups[group][detail] = groups[group].get(detail, 0) + n
    return groups


def _print_probe(r: dict[str, Any]) -> None:
    p = r.get("probe")
    if not p or not p["samples"]:
        return
    n, doing = p["samples"], p["doing"]
    busy = 1 - doing.get("no hold waiting", 0) / n
    line = (
        f"    lock: a hold waiting in {100 * busy:.0f}% of {n} samples (mean {p['mean_waiting']:.1f} waiting)"
    )
    if r["throughput"] and r.get("hot") and busy > 0.5:  # holds queue on the type: it bounds them
        line += f"; held ~{1e3 * busy / r['throughput']:.2f} ms per hold (waited-for share / holds per s)"
    print(line)
    parts = []
    for group, details in sorted(holder_shares(doing).items(), key=lambda g: -sum(g[1].values())):
        share = f"{group} {100 * sum(details.values()) / n:.0f}%"
        if group == "app's turn":
            shown = [f"{k} {100 * v / n:.0f}" for k, v in details.items() if v >= n / 100]
            share += f" ({', '.join(shown)})" if shown else ""
        parts.append(share)
    if parts and busy > 0.05:
        print(f"    lock holder: {', '.join(parts)}")
    if "lock_held_ms" in r:
        m = r["lock_held_ms"]
        print(
            f"    lock held, measured by the client (lock's answer to COMMIT's): mean {m['mean']:.2f} ms"
            f" (1/mean = {1e3 / m['mean']:.0f}/s), p50 {m['p50']:.2f}, p99 {m['p99']:.2f} ms"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64, help="concurrent clients / workers (default 64)")
    p.add_argument("--users", type=int, default=64, help="users on each side (default 64)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds measured per phase (default 15)")
    p.add_argument(
        "--warmup", type=float, default=3.0, help="unmeasured seconds before each phase (default 3)"
    )
    p.add_argument("--no-key", action="store_true", help="hold without an Idempotency-Key (both sides)")
    p.add_argument(
        "--live-holds",
        type=int,
        default=0,
        help="live holds on the hot type at the start of each phase (N/100 on each of the 100 types)",
    )
    p.add_argument("--cases", default="hot,spread", help="hot, spread or both (default hot,spread)")
    p.add_argument("--baseline-pool", type=int, default=64, help="asyncpg pool size (default 64)")
    p.add_argument(
        "--probe-interval-ms", type=float, default=20.0, help="lock sampling period, 0 for none (default 20)"
    )
    p.add_argument(
        "--server-log-level", default="WARNING", help="server PAYGUARD_LOG_LEVEL (default WARNING)"
    )
    p.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE", help="server environment"
    )
    p.add_argument("--skip-baseline", action="store_true", help="HTTP phases only")
    p.add_argument("--json", type=Path, help="also write all results to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        worker_main(args.worker, _worker)
        return 0

    from app.config import Settings
    from app.db.embedded import EmbeddedPostgres
    from app.db.migrate import upgrade

    defaults = Settings()
    ttl_s = defaults.reservation_ttl_s
    server_settings = {  # what app/db/engine.py sets on the service's connections
        "statement_timeout": str(defaults.db_statement_timeout_ms),
        "lock_timeout": str(defaults.db_lock_timeout_ms),
        "idle_in_transaction_session_timeout": "60000",
        "application_name": "payguard-bench-baseline",
    }
    http_users = [f"{HTTP_USERS}{i:02d}" for i in range(args.users)]
    sql_users = [f"{SQL_USERS}{i:02d}" for i in range(args.users)]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    phase_timeout = args.warmup + args.duration + 120

    started = time.monotonic()
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="payguard-bench-"))
    pg: Any = None
    servers: list[tuple[subprocess.Popen[bytes], int]] = []
    results: list[dict[str, Any]] = []
    ok = False
    try:
        pg = EmbeddedPostgres(tmp)
        postmaster_pid = int(pg._server.get_pid())
        asyncio.run(pg.ensure_database(DATABASE))
        url = pg.url(DATABASE)
        upgrade(url)
        key_note = "no Idempotency-Key" if args.no_key else "a fresh Idempotency-Key per hold"
        print(
            f"PostgreSQL: embedded, data in {tmp}; {args.users} users per side; {key_note};"
            f" live holds at each phase's start: {args.live_holds} on the hot type;"
            f" load average before the run {load[0]:.2f} / {load[1]:.2f}"
        )

        env = os.environ | {
            "DATABASE_URL": url,
            "PAYGUARD_JWT_SECRET": SECRET,
            "PAYGUARD_LOG_LEVEL": args.server_log_level,
            "PAYGUARD_RUN_WORKER": "false",
            "PAYGUARD_RATE_RESERVATIONS": str(RATE_LIMIT),
            "PAYGUARD_RATE_WINDOW_S": str(RATE_WINDOW_S),
            "PAYGUARD_RESERVATION_TTL_S": str(ttl_s),
            "PAYGUARD_DATA_DIR": str(tmp / "payguard-data"),
        }
        env |= dict(item.partition("=")[::2] for item in args.server_env)
        _start_servers(1, env, tmp, servers)
        proc, port = servers[0]
        print(
            f"payguard serve: pid {proc.pid} on 127.0.0.1:{port} (log level {args.server_log_level})",
            flush=True,
        )

        statements = baseline_sql()
        common = {
            "server_pids": [proc.pid],
            "postmaster_pid": postmaster_pid,
            "clients": args.clients,
            "keyed": not args.no_key,
            "socket_dir": pg.socket_dir,
            "database": DATABASE,
            "statements": statements,
            "probe_interval": args.probe_interval_ms / 1e3,
            "ttl_s": ttl_s,
        }
        http = {"kind": "http", "ports": [port], "secret": SECRET, "users": http_users}
        sql = {
            "kind": "sql",
            "users": sql_users,
            "pool": args.baseline_pool,
            "server_settings": server_settings,
            "rate_limit": RATE_LIMIT,
        }

        def phase(label: str, case: str, base: dict[str, Any], **spec: Any) -> dict[str, Any]:
            hot = case == "hot"
            count, live = (1, args.live_holds) if hot else (SPREAD_TYPES, args.live_holds // SPREAD_TYPES)
            type_ids = asyncio.run(_sql(pg, lambda c: _new_types(c, count, live, ttl_s)))
            n = len(results)
            spec = common | base | spec | {"label": label, "type_ids": type_ids, "key_prefix": f"bench-{n}"}
            r = run_worker(spec, phase_timeout, __file__) | {"case": case, "hot": hot, "type_ids": type_ids}
            results.append(r)
            _print_phase(r)
            _print_probe(r)
            return r

        print(
            f"\n  {'phase':<34} {'holds/s':>9} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} "
            f"{'non-201':>7} {'app ms':>7} {'pg ms':>7}   cores: server / postgres / loadgen / other",
            flush=True,
        )
        closed = {"mode": "closed", "warmup": args.warmup, "duration": args.duration}
        summary: list[
            tuple[str, dict[str, Any], dict[str, Any] | None, dict[str, Any], dict[str, Any] | None]
        ]
        summary = []
        for case in cases:
            name = "hot" if case == "hot" else f"{SPREAD_TYPES} types"
            peak = phase(f"{name}: HTTP closed, {args.clients} clients", case, http, **closed)
            rate = round(peak["throughput"] / 2, 1)
            opened = {"mode": "open", "rate": rate, "warmup": 1.0, "duration": args.duration}
            half = phase(f"{name}: HTTP open @ {rate:g}/s", case, http, **opened)
            base_peak = base_half = None
            if not args.skip_baseline:
                base_peak = phase(f"{name}: asyncpg closed, {args.clients} wk", case, sql, **closed)
                base_half = phase(f"{name}: asyncpg open @ {rate:g}/s", case, sql, **opened)
            summary.append((name, peak, base_peak, half, base_half))

        print()
        for name, peak, base_peak, half, base_half in summary:
            if base_peak is None or base_half is None:
                continue
            rate = half["rate"]
            for what, key, a, b in [
                ("holds/s, closed loop", "throughput", peak, base_peak),
                ("p99, closed loop", "p99", peak, base_peak),
                (f"p99, open loop @ {rate:g}/s", "p99", half, base_half),
            ]:
                print(f"  {name + ':':<11} HTTP / asyncpg {what:<30} {_ratio(a[key], b[key])}")
        if len(summary) == 2:
            (_, hot, base_hot, *_), (_, spread, base_spread, *_) = summary
            ratio = _ratio(hot["throughput"], spread["throughput"])
            line = f"  hot / {SPREAD_TYPES} types, holds/s closed loop: HTTP {ratio}"
            if base_hot is not None and base_spread is not None:
                line += f", asyncpg {_ratio(base_hot['throughput'], base_spread['throughput'])}"
            print(line)

        hot_phases = [r for r in results if r["hot"]]
        if hot_phases:
            print("\n  the hot type at the end of each phase: live holds, and `_HOLD`'s count of them now")
            for r in hot_phases:
                live, ms = asyncio.run(_sql(pg, lambda c, r=r: _count_cost(c, r["type_ids"][0])))
                r["count_after"] = {"live_holds": live, "count_ms": ms}
                print(f"    {r['label']:<34} {live:>8} live holds, counted in {ms:.2f} ms")

        other = max(r["cpu"]["other"] for r in results)
        print(f"\n  `other` cores (processes outside the bench): up to {other:.2f}", end="")
        print(" -> the figures are disturbed" if other > 0.15 else "")

        check = asyncio.run(_sql(pg, lambda c: _verify(c, results)))
        answered_201 = [r["statuses"].get("201", 0) for r in results]
        non201 = sum(_non201(r) for r in results)
        print(
            f"\n  check: ticket types over capacity = {check['over_capacity']};"
            f" hold rows = 201 answers in every phase: {check['rows'] == answered_201}"
            f" ({sum(check['rows'])} rows, {sum(answered_201)} answers); non-201 = {non201}"
        )
        keys_ok = check["keys"] == check["keys_201"] == (0 if args.no_key else sum(answered_201))
        print(f"         idempotency keys = {check['keys']}, stored with 201 = {check['keys_201']}")
        for r, rows, n in zip(results, check["rows"], answered_201, strict=True):
            if rows != n:
                print(f"    ! {r['label']}: {rows} hold rows, {n} answers 201")
        ok = check["over_capacity"] == 0 and check["rows"] == answered_201 and non201 == 0 and keys_ok
        print(f"  check {'passed' if ok else 'FAILED'}; the run took {time.monotonic() - started:.0f} s")
        if args.json is not None:
            report = {"load_before": load, "phases": results, "check": check, "passed": ok}
            args.json.write_text(json.dumps(report, indent=2, default=str))
    except Exception:
        for i in range(len(servers)):
            print(f"--- server {i} log (tail) ---\n{_tail(tmp / f'server-{i}.log')}", file=sys.stderr)
        raise
    finally:
        _stop_servers(servers)
        if pg is not None:
            pg.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
