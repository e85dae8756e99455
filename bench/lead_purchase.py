"""Lead-purchase benchmark: the real service over HTTP against the same SQL issued through asyncpg.

One run, no arguments needed:

1. a private embedded PostgreSQL in a temp dir, migrated to head;
2. `payguard serve` as a subprocess on 127.0.0.1 (rate limit set out of the way);
3. seeded leads (every purchase buys a different one) and 64 funded users;
4. HTTP, closed loop: 64 clients on keep-alive connections, each `POST /v1/leads/{id}/purchase`
   with a bearer token and a fresh Idempotency-Key -> peak purchases/s;
   HTTP, open loop: a fixed arrival rate of half that peak -> p50/p99 (target: p99 < 25 ms);
5. baseline: the same transactions as `purchase_lead` (key insert, rate-limit upsert, the fenced
   purchase transaction), statement for statement (the service's own statements, compiled as
   SQLAlchemy sends them), straight through an asyncpg pool; closed loop with 64 workers, then
   open loop at the same arrival rate as the HTTP open loop;
6. both side by side with the ratios, then SQL checks (no negative balance, sold leads == 201s).

The load generators run in their own processes (this file, with a hidden `--worker` option), so the
orchestrator is idle while measuring. Open-loop latency is measured from each request's scheduled
arrival time, so a stalled server cannot hide its queueing delay (no coordinated omission).

Besides latency, each phase reports CPU: `app ms` and `pg ms` are CPU milliseconds per purchase of
the application (the server processes; for the baseline, the asyncpg client) and of all PostgreSQL
processes; the cores columns split the machine between server, PostgreSQL, load generator and
`other` (anything else running on the machine: when it is not near 0 the figures are disturbed).

    .venv/bin/python bench/lead_purchase.py [--clients 64] [--duration 15] [--servers 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import operator
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

DATABASE = "payguard_bench"
SECRET = "bench-secret-that-is-long-enough-for-hs256-0123456789"
LEAD_PRICE = 10
START_BALANCE = 10**12
RATE_LIMIT = 10**9  # PAYGUARD_RATE_LEAD_PURCHASES: far above anything the bench can reach
RATE_WINDOW_S = 60  # the service's default PAYGUARD_RATE_WINDOW_S
HTTP_USER = "bench-http-{:02d}"
SQL_USER = "bench-sql-{:02d}"
TARGET_P99_MS = 25.0

# ---------------------------------------------------------------------------------------------------------
# The baseline: the statements `purchase_lead` sends, in the same order and transactions. They are the
# service's own prebuilt text() statements, compiled by SQLAlchemy's asyncpg dialect into the exact text
# the service sends ($n placeholders, bind casts), so a change to the service's SQL is a change to the
# baseline's. tests/integration/test_bench_baseline.py runs one purchase each way and compares what reached
# PostgreSQL, statement for statement and transaction for transaction.
# ---------------------------------------------------------------------------------------------------------

BaselineSql = dict[str, tuple[str, list[str]]]  # statement -> (SQL as sent, its parameter names in $n order)


def baseline_sql() -> BaselineSql:
    """The SQL of each statement the baseline sends, compiled from the service modules' statements."""
    from app.credits import service as credits
    from app.idempotency import service as keys
    from app.leads import service as leads
    from app.notifications import service as notifications
    from app.ratelimit import service as ratelimit

    statements = {
        "key insert": keys._INSERT_KEY,  # idempotency._acquire: its own transaction
        "rate-limit upsert": ratelimit._ADMIT,  # ratelimit.hit: its own transaction
        "key fence": keys._FENCE,  # idempotency.step: the purchase transaction from here
        "lead lock": leads._LOCK_LEAD,
        "debit": credits._DEBIT,  # credits.apply_ledger_entry
        "ledger entry": credits._LEDGER,
        "lead sale": leads._SELL_LEAD,
        "purchase record": leads._RECORD_SALE,
        "outbox insert": notifications._ENQUEUE,  # notifications.enqueue_emails
        "key finish": keys._FINISH,  # Step.finish
    }
    return compile_statements(statements)


def compile_statements(statements: dict[str, Any]) -> BaselineSql:
    """Each statement as SQLAlchemy's asyncpg dialect sends it: its text and its parameters in $n order."""
    from sqlalchemy.dialects.postgresql.asyncpg import dialect

    out: BaselineSql = {}
    for name, statement in statements.items():
        compiled = statement.compile(dialect=dialect())
        out[name] = (str(compiled), list(compiled.positiontup or ()))
    return out


class _Statement:
    """One of the service's statements; called with its parameters by name, gives asyncpg's arguments."""

    __slots__ = ("_name", "_pick", "sql")

    def __init__(self, name: str, sql: str, params: list[str]) -> None:
        self._name, self.sql = name, sql
        pick: Callable[[dict[str, Any]], Any] = operator.itemgetter(*params) if params else lambda _: ()
        self._pick = pick if len(params) != 1 else lambda values: (pick(values),)

    def __call__(self, **values: Any) -> tuple[Any, ...]:
        try:
            return (self.sql, *self._pick(values))
        except KeyError as exc:
            raise RuntimeError(
                f"the service's {self._name} statement now binds :{exc.args[0]}, which the baseline does "
                f"not give (bench/lead_purchase.py, baseline_purchase):\n{self.sql}"
            ) from None


class _Reject(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def baseline_purchase(
    acquire: Callable[[], Any], sql: BaselineSql, *, rate_limit: int, window_s: int
) -> Callable[[int, str], Awaitable[int]]:
    """`purchase(lead_id, user) -> status`: one lead purchase as `purchase_lead` makes it, through asyncpg.

    `acquire()` opens a connection (an asyncpg pool's `acquire`); `sql` comes from `baseline_sql()`; the
    settings are the service's (rate limit and window, as `payguard serve` runs with).
    """
    import msgspec

    from app.idempotency.service import RecoveryPoint
    from app.leads.models import LeadStatus
    from app.notifications.models import EmailStatus
    from app.notifications.service import EmailKind

    def statement(name: str) -> _Statement:
        return _Statement(name, *sql[name])

    key_insert, rate_admit = statement("key insert"), statement("rate-limit upsert")
    key_fence, lead_lock = statement("key fence"), statement("lead lock")
    debit, ledger = statement("debit"), statement("ledger entry")
    lead_sale, purchase_record = statement("lead sale"), statement("purchase record")
    outbox_insert, key_finish = statement("outbox insert"), statement("key finish")
    interval = window_s / rate_limit

    async def purchase(lead_id: int, user: str) -> int:
        path = f"/v1/leads/{lead_id}/purchase"
        fingerprint = hashlib.sha256(b"\n".join([b"POST", path.encode(), b""])).hexdigest()
        async with acquire() as c, c.transaction():
            key_id = await c.fetchval(
                *key_insert(
                    user_id=user,
                    key=f"bench-{lead_id}",
                    method="POST",
                    path=path,
                    fingerprint=fingerprint,
                    params=json.dumps({"lead_id": lead_id, "recipient": None}),
                    point=RecoveryPoint.STARTED,
                )
            )
        if key_id is None:
            return 409
        async with acquire() as c, c.transaction():
            admitted = await c.fetchval(
                *rate_admit(key=f"lead_purchase:{user}", interval=interval, window=window_s)
            )
        if admitted is None:
            return 429
        try:
            async with acquire() as c, c.transaction():
                if await c.fetchval(*key_fence(key_id=key_id, token=1)) is None:
                    raise _Reject(409)
                lead = await c.fetchrow(*lead_lock(lead_id=lead_id))
                if lead is None:
                    raise _Reject(404)
                if lead["status"] != LeadStatus.AVAILABLE:
                    raise _Reject(409)
                price = lead["price_credits"]
                balance = await c.fetchval(*debit(cost=price, user_id=user))
                if balance is None:
                    raise _Reject(402)
                entry_id = await c.fetchval(
                    *ledger(
                        user_id=user,
                        delta=-price,
                        balance_after=balance,
                        reason=f"purchase of lead {lead_id}",
                        reference=f"lead_purchase:{lead_id}",
                    )
                )
                await c.execute(*lead_sale(lead_id=lead_id, buyer_id=user, sold=LeadStatus.SOLD))
                purchase_id = await c.fetchval(
                    *purchase_record(
                        lead_id=lead_id, user_id=user, price_credits=price, ledger_entry_id=entry_id
                    )
                )
                email = {"lead_id": lead_id, "purchase_id": purchase_id, "title": lead["title"]}
                payload = msgspec.json.encode(email).decode()
                await c.fetchval(
                    *outbox_insert(  # notifications.enqueue_emails: one email
                        kinds=[EmailKind.LEAD_PURCHASED],
                        user_ids=[user],
                        recipients=[None],  # the bench's tokens carry no email claim
                        payloads=[payload],
                        statuses=[EmailStatus.SKIPPED],  # nobody to send it to
                        trace_contexts=["{}"],
                    )
                )
                body = msgspec.json.encode(
                    {
                        "purchase_id": purchase_id,
                        "lead_id": lead_id,
                        "price_credits": price,
                        "balance": balance,
                    }
                )
                await c.execute(
                    *key_finish(status=201, body=body.decode(), point=RecoveryPoint.FINISHED, key_id=key_id)
                )
        except _Reject as rejected:
            return rejected.status
        return 201

    return purchase


# ---------------------------------------------------------------------------------------------------------
# Load generator (runs in its own process: `lead_purchase.py --worker '<json spec>'`)
# ---------------------------------------------------------------------------------------------------------


class _HttpConnection(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive client: one request in flight, Content-Length bodies only."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is None or self._waiter.done():
            return
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buf[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self._waiter.set_exception(ConnectionError("response without Content-Length"))
            return
        eol = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : eol if eol >= 0 else len(head)])
        total = end + 4 + length
        if len(self._buf) < total:
            return
        status, body = int(self._buf[9:12]), bytes(self._buf[end + 4 : total])
        del self._buf[:total]
        self._waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self._transport is None:
            raise ConnectionError("not connected")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(data)
        return await self._waiter

    @property
    def connected(self) -> bool:
        return self._transport is not None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class _CpuWatch:
    """CPU used by the server processes, all PostgreSQL processes, this load generator and the machine."""

    def __init__(self, server_pids: list[int], postmaster_pid: int) -> None:
        import psutil

        self._psutil = psutil
        self._server_pids, self._postmaster_pid = server_pids, postmaster_pid
        self._start: dict[str, Any] = {}

    def _sample(self) -> dict[str, Any]:
        ps = self._psutil

        def cpu(pid: int) -> float:
            try:
                t = ps.Process(pid).cpu_times()
                return float(t.user + t.system)
            except ps.Error:
                return 0.0

        postgres: dict[int, float] = {}
        try:
            master = ps.Process(self._postmaster_pid)
            for p in [master, *master.children()]:
                postgres[p.pid] = cpu(p.pid)
        except ps.Error:
            pass
        t = ps.cpu_times()
        return {
            "wall": time.perf_counter(),
            "server": sum(cpu(pid) for pid in self._server_pids),
            "postgres": postgres,
            "loadgen": time.process_time(),
            "machine": t.user + t.system + t.nice + t.irq + t.softirq + getattr(t, "steal", 0.0),
        }

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        """Average cores busy over the window; a backend that started inside it counts in full."""
        end, start = self._sample(), self._start
        wall = end["wall"] - start["wall"]
        pg = sum(v - start["postgres"].get(pid, 0.0) for pid, v in end["postgres"].items())
        used = {
            "server": end["server"] - start["server"],
            "postgres": pg,
            "loadgen": end["loadgen"] - start["loadgen"],
            "machine": end["machine"] - start["machine"],
        }
        cores = {k: v / wall for k, v in used.items()}
        # anything else running on the machine (another test run, ...) skews the figures: show it
        cores["other"] = max(0.0, cores["machine"] - cores["server"] - cores["postgres"] - cores["loadgen"])
        return cores | {"seconds": wall}


def bearer_tokens(users: list[str], secret: str) -> dict[str, str]:
    """An HS256 bearer token per user, valid for an hour (what `payguard token` issues)."""
    import jwt

    issued = int(time.time())
    return {
        u: jwt.encode({"sub": u, "iat": issued, "exp": issued + 3600}, secret, algorithm="HS256")
        for u in users
    }


class HttpClients:
    """One keep-alive connection per client; client i talks to server i % len(ports) (round-robin)."""

    def __init__(self, ports: list[int], samples: list[str]) -> None:
        self._ports, self._samples = ports, samples
        self.slots: list[list[Any]] = []  # [connection, port] per client

    async def _connect(self, port: int) -> _HttpConnection:
        _, conn = await asyncio.get_running_loop().create_connection(_HttpConnection, "127.0.0.1", port)
        return conn

    async def open(self, clients: int) -> None:
        for i in range(clients):
            port = self._ports[i % len(self._ports)]
            self.slots.append([await self._connect(port), port])

    async def close(self) -> None:
        for s in self.slots:
            s[0].close()

    async def send(self, slot: list[Any], request: Callable[[int], bytes]) -> int:
        """Send `request(port)` on the client's connection; its status (0: connection lost)."""
        conn, port = slot
        if not conn.connected:  # closed by the server while idle (keep-alive timeout): not an error
            conn = slot[0] = await self._connect(port)
        status: int
        body: bytes
        try:
            status, body = await conn.request(request(port))
        except ConnectionError as exc:
            conn.close()
            slot[0] = await self._connect(port)
            status, body = 0, str(exc).encode()
        if status != 201 and len(self._samples) < 5:
            self._samples.append(f"{status} {body[:300]!r}")
        return status


async def baseline_pool(spec: dict[str, Any]) -> Any:
    """The baseline's asyncpg pool of `spec['pool']` connections, set up like the service's engine."""
    import asyncpg

    async def no_reset(_conn: Any) -> None:
        return None  # like SQLAlchemy's pool: nothing sent to the server on check-in

    return await asyncpg.create_pool(
        host=spec["socket_dir"],
        user="postgres",
        database=spec["database"],
        min_size=spec["pool"],
        max_size=spec["pool"],
        reset=no_reset,
        server_settings=spec["server_settings"],
    )


Take = Callable[[], Any]  # the next request's input, or None when there is nothing left to ask for
Call = Callable[[Any, Any, str], Awaitable[int]]  # (client's slot, input, user) -> status
# (start, end of the measured window) -> figures of its own
Probe = Callable[[float, float], Coroutine[Any, Any, dict[str, Any]]]


async def run_load(
    spec: dict[str, Any], slots: list[Any], take: Take, call: Call, probe: Probe | None = None
) -> dict[str, Any]:
    """The closed or open loop of `spec` over `slots` (one per client), with latencies and CPU.

    Closed loop: each client sends back to back for warm-up + duration. Open loop: arrivals at
    `spec['rate']`, each on the first free client, its latency counted from its scheduled arrival.
    `probe`, if given, runs beside the load over the measured window; its figures come back as `probe`.
    """
    users: list[str] = spec["users"]
    clients: int = spec["clients"]
    statuses: Counter[int] = Counter()  # every answer, warm-up included (for the final SQL check)
    window_statuses: Counter[int] = Counter()
    latencies: list[float] = []
    completed_in_window = 0
    lags: list[float] = []
    warmup, duration = spec["warmup"], spec["duration"]
    cpu = _CpuWatch(spec["server_pids"], spec["postmaster_pid"])
    t0 = time.perf_counter()
    t_measure, t_end = t0 + warmup, t0 + warmup + duration
    exhausted = False

    def record(status: int, started: float, done: float) -> None:
        nonlocal completed_in_window
        statuses[status] += 1
        if t_measure <= started < t_end:
            window_statuses[status] += 1
            latencies.append(done - started)
        if t_measure <= done < t_end:
            completed_in_window += 1

    async def cpu_window() -> dict[str, float]:
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        cpu.start()
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        return cpu.stop()

    watcher = asyncio.create_task(cpu_window())
    probing = asyncio.create_task(probe(t_measure, t_end)) if probe is not None else None

    if spec["mode"] == "closed":

        async def client(i: int) -> None:
            nonlocal exhausted
            user = users[i % len(users)]
            while time.perf_counter() < t_end:
                item = take()
                if item is None:
                    exhausted = True
                    return
                started = time.perf_counter()
                status = await call(slots[i], item, user)
                record(status, started, time.perf_counter())

        await asyncio.gather(*(client(i) for i in range(clients)))
    else:
        rate = spec["rate"]
        free: asyncio.Queue[Any] = asyncio.Queue()
        for s in slots:
            free.put_nowait(s)
        inflight: set[asyncio.Task[None]] = set()

        async def one(n: int, item: Any, due: float) -> None:
            slot = await free.get()
            try:
                status = await call(slot, item, users[n % len(users)])
            finally:
                free.put_nowait(slot)
            record(status, due, time.perf_counter())  # latency from the scheduled arrival

        n = 0
        while True:
            due = t0 + n / rate
            if due >= t_end:
                break
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
                now = time.perf_counter()
            item = take()
            if item is None:
                exhausted = True
                break
            if due >= t_measure:
                lags.append(now - due)
            task = asyncio.create_task(one(n, item, due))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            n += 1
        if inflight:
            await asyncio.gather(*inflight)

    cpu_use = await watcher
    probed = await probing if probing is not None else None
    latencies.sort()

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, max(0, math.ceil(q * len(latencies)) - 1))] * 1e3

    lags.sort()
    return {
        "label": spec["label"],
        "kind": spec["kind"],
        "mode": spec["mode"],
        "clients": clients,
        "rate": spec.get("rate"),
        "seconds": duration,
        "throughput": completed_in_window / duration,
        "measured": len(latencies),
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": pct(1.0),
        "mean": (sum(latencies) / len(latencies) * 1e3) if latencies else None,
        "window_statuses": {str(k): v for k, v in sorted(window_statuses.items())},
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "exhausted": exhausted,
        "dispatch_lag_p99_ms": lags[min(len(lags) - 1, math.ceil(0.99 * len(lags)) - 1)] * 1e3
        if lags
        else None,
        "cpu": cpu_use,
        "probe": probed,
        "window": [t_measure, t_end],  # time.perf_counter() in the load generator's process
    }


async def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    next_lead: int = spec["lead_lo"]
    last_lead: int = spec["lead_hi"]

    def take_lead() -> int | None:
        nonlocal next_lead
        if next_lead >= last_lead:
            return None
        next_lead += 1
        return next_lead - 1

    # --- the request, as a coroutine `call(slot, lead_id, user) -> status` -------------------------------
    samples: list[str] = []
    slots: list[Any]
    call: Call
    close: Callable[[], Awaitable[None]]
    if spec["kind"] == "http":
        tokens = bearer_tokens(spec["users"], spec["secret"])
        http = HttpClients(spec["ports"], samples)
        await http.open(spec["clients"])
        slots, close = http.slots, http.close

        async def call_http(slot: Any, lead_id: int, user: str) -> int:
            def request(port: int) -> bytes:
                return (
                    f"POST /v1/leads/{lead_id}/purchase HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Authorization: Bearer {tokens[user]}\r\nIdempotency-Key: bench-{lead_id}\r\n"
                    "Content-Length: 0\r\n\r\n"
                ).encode()

            return await http.send(slot, request)

        call = call_http
    else:
        pool = await baseline_pool(spec)
        slots, close = [None] * spec["clients"], pool.close
        purchase = baseline_purchase(
            pool.acquire,
            spec["statements"],
            rate_limit=spec["rate_limit"],
            window_s=RATE_WINDOW_S,
        )

        async def call_sql(slot: Any, lead_id: int, user: str) -> int:
            try:
                return await purchase(lead_id, user)
            except Exception as exc:
                if len(samples) < 5:
                    samples.append(f"{type(exc).__name__}: {exc}")
                return 0

        call = call_sql

    try:
        result = await run_load(spec, slots, take_lead, call)
    finally:
        await close()
    return result | {"leads_used": next_lead - spec["lead_lo"], "samples": samples}


def worker_main(raw: str, worker: Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]) -> None:
    """A load generator process: run `worker` on the JSON spec, print its result as one JSON line."""
    import uvloop  # a project dependency, as in serve and the worker

    uvloop.install()
    result = asyncio.run(worker(json.loads(raw)))
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"payguard serve exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"payguard serve not ready after {timeout:.0f} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def _sql(pg: Any, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    import asyncpg

    conn = await asyncpg.connect(host=pg.socket_dir, user="postgres", database=DATABASE)
    try:
        return await fn(conn)
    finally:
        await conn.close()


async def _seed(conn: Any, leads: int, users: list[str]) -> tuple[int, int]:
    await conn.execute(
        """
        INSERT INTO leads (title, price_credits, details, status)
        SELECT 'bench lead ' || g, $1::bigint,
               jsonb_build_object('phone', '+1 555 0100', 'company', 'Acme ' || g, 'n', g), 'available'
          FROM generate_series(1, $2::int) g
        """,
        LEAD_PRICE,
        leads,
    )
    await conn.execute(
        "INSERT INTO credit_accounts (user_id, balance) SELECT u, $2::bigint FROM unnest($1::text[]) u",
        users,
        START_BALANCE,
    )
    await conn.execute("ANALYZE")
    lo, hi, n = await conn.fetchrow("SELECT min(id), max(id), count(*) FROM leads")
    assert n == leads and hi - lo + 1 == n, "lead ids are not contiguous"
    return int(lo), int(hi) + 1


async def _verify(conn: Any) -> dict[str, Any]:
    row = await conn.fetchrow(
        """
        SELECT (SELECT count(*) FROM credit_accounts WHERE balance < 0) AS negative,
               (SELECT min(balance) FROM credit_accounts) AS min_balance,
               (SELECT count(*) FROM leads WHERE status = 'sold') AS sold,
               (SELECT count(*) FROM leads WHERE status = 'sold' AND buyer_id LIKE 'bench-http-%')
                   AS sold_http,
               (SELECT count(*) FROM leads WHERE status = 'sold' AND buyer_id LIKE 'bench-sql-%')
                   AS sold_sql,
               (SELECT count(*) FROM lead_purchases) AS purchases,
               (SELECT count(*) FROM outbox_emails) AS emails,
               (SELECT count(*) FROM credit_ledger) AS ledger,
               (SELECT count(*) FROM idempotency_keys WHERE response_status = 201) AS keys_201,
               (SELECT coalesce(sum($1::bigint - balance), 0) FROM credit_accounts) AS debited,
               (SELECT coalesce(sum(price_credits), 0) FROM lead_purchases) AS paid
        """,
        START_BALANCE,
    )
    return dict(row)


def run_worker(spec: dict[str, Any], timeout: float, script: str = __file__) -> dict[str, Any]:
    """Run `script --worker '<spec>'` (a load generator in its own process) and return its result."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(
            f"load generator {spec['label']!r} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def _non201(r: dict[str, Any]) -> int:
    return sum(n for s, n in r["statuses"].items() if s != "201")


def _print_phase(r: dict[str, Any]) -> None:
    figures = " ".join(f"{_ms(r[k]):>7}" for k in ("p50", "p90", "p99", "max"))
    c = r["cpu"]
    cores = " / ".join(f"{c[k]:.2f}" for k in ("server", "postgres", "loadgen", "other"))
    # CPU ms per purchase: the application (the server; for the baseline, the asyncpg client) and PostgreSQL
    rate = r["throughput"] or float("nan")
    app_ms, pg_ms = 1e3 * c["server" if r["kind"] == "http" else "loadgen"] / rate, 1e3 * c["postgres"] / rate
    per = f"{app_ms:>7.2f} {pg_ms:>7.2f}"
    print(f"  {r['label']:<34} {r['throughput']:>9.1f} {figures} {_non201(r):>7} {per}   {cores}", flush=True)
    if r["exhausted"]:
        print("    ! ran out of seeded leads before the end of the phase (raise --leads)")
    for s in r["samples"]:
        print(f"    non-201 sample: {s}")
    for line in r.get("stderr", "").splitlines()[-10:]:
        print(f"    load generator: {line}")


def _start_servers(
    count: int, env: dict[str, str], tmp: Path, servers: list[tuple[subprocess.Popen[bytes], int]]
) -> None:
    """`payguard serve` processes on loopback, each on its own port (replicas behind a balancer)."""
    cmd = [sys.executable, "-c", "from app.cli import main; main()", "serve", "--host", "127.0.0.1"]
    for i in range(count):
        port = _free_port()
        with (tmp / f"server-{i}.log").open("wb") as log:
            servers.append(
                (subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=log, stderr=log), port)
            )
    for i, (proc, port) in enumerate(servers):
        _wait_ready(proc, port, tmp / f"server-{i}.log")


def _stop_servers(servers: list[tuple[subprocess.Popen[bytes], int]]) -> None:
    for proc, _ in servers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _ in servers:
        try:
            proc.wait(timeout=25)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64, help="concurrent clients / workers (default 64)")
    p.add_argument("--users", type=int, default=64, help="funded users on each side (default 64)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds measured per phase (default 15)")
    p.add_argument(
        "--warmup", type=float, default=3.0, help="unmeasured seconds before each phase (default 3)"
    )
    p.add_argument("--leads", type=int, default=300_000, help="leads seeded (default 300000)")
    p.add_argument("--rate", type=float, help="open-loop arrivals per second (default: half the HTTP peak)")
    p.add_argument("--servers", type=int, default=1, help="`payguard serve` processes (default 1)")
    p.add_argument(
        "--baseline-pool", type=int, help="asyncpg pool size (default: the service's pool maximum)"
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
    pool_size = args.baseline_pool or defaults.db_pool_size + defaults.db_max_overflow
    server_settings = {  # what app/db/engine.py sets on the service's connections
        "statement_timeout": str(defaults.db_statement_timeout_ms),
        "lock_timeout": str(defaults.db_lock_timeout_ms),
        "idle_in_transaction_session_timeout": "60000",
        "application_name": "payguard-bench-baseline",
    }
    http_users = [HTTP_USER.format(i) for i in range(args.users)]
    sql_users = [SQL_USER.format(i) for i in range(args.users)]
    phase_timeout = args.warmup + args.duration + 60

    started = time.monotonic()
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
        lead_lo, lead_hi = asyncio.run(_sql(pg, lambda c: _seed(c, args.leads, http_users + sql_users)))
        print(f"PostgreSQL: embedded, data in {tmp}; seeded {args.leads} leads, {2 * args.users} accounts")

        env = os.environ | {
            "DATABASE_URL": url,
            "PAYGUARD_JWT_SECRET": SECRET,
            "PAYGUARD_LOG_LEVEL": args.server_log_level,
            "PAYGUARD_RATE_LEAD_PURCHASES": str(RATE_LIMIT),
            "PAYGUARD_RATE_WINDOW_S": str(RATE_WINDOW_S),
            "PAYGUARD_DATA_DIR": str(tmp / "payguard-data"),
        }
        env |= dict(item.partition("=")[::2] for item in args.server_env)
        _start_servers(args.servers, env, tmp, servers)
        where = ", ".join(f"pid {proc.pid} on 127.0.0.1:{port}" for proc, port in servers)
        print(f"payguard serve: {where} (log level {args.server_log_level})", flush=True)

        cursor = lead_lo
        common = {
            "server_pids": [proc.pid for proc, _ in servers],
            "postmaster_pid": postmaster_pid,
            "clients": args.clients,
        }
        http = {"kind": "http", "ports": [port for _, port in servers], "secret": SECRET, "users": http_users}
        sql = {
            "kind": "sql",
            "users": sql_users,
            "socket_dir": pg.socket_dir,
            "database": DATABASE,
            "pool": pool_size,
            "server_settings": server_settings,
            "rate_limit": RATE_LIMIT,
            "statements": baseline_sql(),
        }

        def phase(label: str, base: dict[str, Any], **spec: Any) -> dict[str, Any]:
            nonlocal cursor
            spec = common | base | spec | {"label": label, "lead_lo": cursor, "lead_hi": lead_hi}
            r = run_worker(spec, phase_timeout)
            cursor += r["leads_used"]
            results.append(r)
            _print_phase(r)
            return r

        print(
            f"\n  {'phase':<34} {'purch/s':>9} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} "
            f"{'non-201':>7} {'app ms':>7} {'pg ms':>7}   cores: server / postgres / loadgen / other",
            flush=True,
        )
        closed = {"mode": "closed", "warmup": args.warmup, "duration": args.duration}
        peak = phase(f"HTTP closed loop, {args.clients} clients", http, **closed)
        rate = args.rate or round(peak["throughput"] / 2, 1)
        opened = {"mode": "open", "rate": rate, "warmup": 1.0, "duration": args.duration}
        half = phase(f"HTTP open loop @ {rate:g}/s", http, **opened)
        if not args.skip_baseline:
            base_peak = phase(f"asyncpg closed loop, {args.clients} workers", sql, **closed)
            base_half = phase(f"asyncpg open loop @ {rate:g}/s", sql, **opened)
            print()
            for name, key, a, b in [
                ("throughput, closed loop", "throughput", peak, base_peak),
                ("p50, closed loop", "p50", peak, base_peak),
                ("p99, closed loop", "p99", peak, base_peak),
                (f"p50, open loop @ {rate:g}/s", "p50", half, base_half),
                (f"p99, open loop @ {rate:g}/s", "p99", half, base_half),
            ]:
                print(f"  HTTP / asyncpg {name:<30} {_ratio(a[key], b[key])}")

        served = half["throughput"]
        met = half["p99"] is not None and half["p99"] < TARGET_P99_MS and served >= 0.97 * rate
        at = "half peak" if args.rate is None else "the given rate"
        print(
            f"\n  target p99 < {TARGET_P99_MS:g} ms at {at}"
            f" ({rate:g}/s offered, {served:.1f}/s served):"
            f" p99 = {_ms(half['p99'])} ms -> {'MET' if met else 'NOT MET'}"
        )
        if half["dispatch_lag_p99_ms"] is not None:
            lag = half["dispatch_lag_p99_ms"]
            print(
                f"  (p99 lag of the load generator's own dispatch: {lag:.2f} ms, included in the latencies)"
            )
        other = max(r["cpu"]["other"] for r in results)
        if other > 0.15:
            print(f"  ! up to {other:.2f} cores were busy with other processes: the figures are disturbed")

        check = asyncio.run(_sql(pg, _verify))
        http_201 = sum(r["statuses"].get("201", 0) for r in results if r["kind"] == "http")
        sql_201 = sum(r["statuses"].get("201", 0) for r in results if r["kind"] == "sql")
        non201 = sum(_non201(r) for r in results)
        print(
            f"\n  check: negative balances = {check['negative']} (lowest {check['min_balance']}); "
            f"sold leads = {check['sold']} (HTTP {check['sold_http']}, asyncpg {check['sold_sql']}); "
            f"201 answers = {http_201 + sql_201} (HTTP {http_201}, asyncpg {sql_201}); non-201 = {non201}"
        )
        print(
            f"         lead_purchases = {check['purchases']}, ledger entries = {check['ledger']}, "
            f"outbox emails = {check['emails']}, keys stored with 201 = {check['keys_201']}, "
            f"credits debited = {check['debited']} = paid {check['paid']}"
        )
        ok = (
            check["negative"] == 0
            and non201 == 0
            and check["sold_http"] == http_201
            and check["sold_sql"] == sql_201
            and check["sold"] == check["purchases"] == check["ledger"] == check["emails"] == check["keys_201"]
            and check["debited"] == check["paid"]
        )
        print(f"  check {'passed' if ok else 'FAILED'}; the run took {time.monotonic() - started:.0f} s")
        if args.json is not None:
            report = {"rate": rate, "phases": results, "check": check, "passed": ok}
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
