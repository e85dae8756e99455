"""payguard serve | worker | operator | jobs | migrate | token (demo arrives with its issue)."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy.exc import DBAPIError

from app.config import ConfigError, Settings, default_data_dir, load_settings
from app.observability.logging import configure_logging

if TYPE_CHECKING:
    from app.db.embedded import EmbeddedPostgres

log = logging.getLogger("payguard.cli")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block ends, then act as they would have."""
    caught: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda signum, _frame: caught.append(signum))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])


@contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The configured URL, or the embedded server of the data dir (started if none runs there)."""
    if settings.database_url is not None:
        yield settings.database_url
        return
    import asyncio

    from app.db.embedded import EmbeddedPostgres

    with ExitStack() as stack:
        # a stop while PostgreSQL starts is acted on once this process holds the server, so that
        # the way out stops it; raised any earlier, it would leave a server nobody stops
        with stop_signals_deferred():
            pg = EmbeddedPostgres(settings.data_dir)
            stack.callback(_release, pg)
        asyncio.run(pg.ensure_database())
        log.info("embedded PostgreSQL ready", extra={"socket_dir": pg.socket_dir})
        yield pg.url()


def _release(pg: EmbeddedPostgres) -> None:
    with stop_signals_deferred():  # a second stop must not cut `pg_ctl stop` short
        pg.close()  # stops PostgreSQL if no other payguard process holds it


def serve(settings: Settings, args: argparse.Namespace) -> None:
    import uvicorn

    from app.auth import resolve_jwt_secret
    from app.db.migrate import upgrade
    from app.main import create_app

    secret = resolve_jwt_secret(settings)  # refuse to start without a way to check tokens, before the DB
    with database(settings) as url:
        upgrade(url)
        options = {
            "host": args.host,
            "port": args.port,
            "loop": "uvloop",
            "http": "httptools",
            "log_config": None,
            "access_log": False,
            "timeout_graceful_shutdown": 20,
        }
        log.info(
            "serving",
            extra={
                "host": args.host,
                "port": args.port,
                "embedded": settings.embedded,
                "processes": args.processes,
            },
        )
        if args.processes == 1:
            uvicorn.run(_frozen(create_app(settings, url)), **options)
        else:
            # every process serves the same database with the same secret, as replicas do; this one
            # supervises them and holds the embedded PostgreSQL
            os.environ["DATABASE_URL"] = url
            if secret is not None:
                os.environ["PAYGUARD_JWT_SECRET"] = secret
            uvicorn.run("app.cli:app_from_environment", factory=True, workers=args.processes, **options)
    log.info("stopped")


def app_from_environment() -> Any:
    """What each process of `serve --processes N` serves (uvicorn calls it in the process)."""
    from app.main import create_app

    settings = load_settings()
    configure_logging(settings.log_level)
    return _frozen(create_app(settings, settings.database_url or ""))


def _frozen(app: Any) -> Any:
    # start-up objects live for the whole process: keep them out of the GC's full collections,
    # which otherwise pause every request for tens of milliseconds under load
    gc.collect()
    gc.freeze()
    return app


def worker(settings: Settings, args: argparse.Namespace) -> None:
    import asyncio

    import uvloop

    from app.db.engine import create_engine
    from app.db.migrate import upgrade
    from app.main import build_services
    from app.worker.runner import Worker

    if args.metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(args.metrics_port, addr=args.metrics_host)
        except OSError as exc:  # not a database problem, which is what main() would call an OSError
            raise ConfigError(f"--metrics-port {args.metrics_port}: cannot listen ({exc.strerror})") from None

    async def run(url: str) -> None:
        engine = create_engine(settings, url)
        runner = Worker(build_services(settings, engine), engine)
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:  # stop claiming, finish or give back what is held, exit 0
            loop.add_signal_handler(signum, runner.stop)
        log.info(
            "worker running", extra={"smtp": settings.smtp_host is not None, "driver": settings.retry_driver}
        )
        try:
            await runner.run()
        finally:
            await engine.dispose()

    with database(settings) as url:
        upgrade(url)
        # the loop serve runs on too: its socket I/O is most of the worker's CPU (docs/performance.md)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
            loop_runner.run(run(url))


def operator(settings: Settings, args: argparse.Namespace) -> None:
    """The FailedOperation operator (code in operator/, imported only here: app never depends on it)."""
    import asyncio

    from app.db.migrate import upgrade
    from payguard_operator.main import kube_config, operate, serve_metrics

    if settings.retry_driver != "kubernetes":  # the worker would retry them too: say so, do not race it
        raise ConfigError("payguard operator needs PAYGUARD_RETRY_DRIVER=kubernetes, in the workers too")
    kube_config()  # a missing cluster is said before any database is started
    serve_metrics(settings)
    with database(settings) as url:
        upgrade(url)
        asyncio.run(operate(settings, url))


def jobs(settings: Settings, args: argparse.Namespace) -> None:
    """Run one job once (a CronJob's command); the run record is printed as JSON. Exit 1 if it failed."""
    import asyncio

    import msgspec

    from app.db.engine import create_engine
    from app.db.migrate import upgrade
    from app.jobs.models import JobName, RunOutcome
    from app.jobs.registry import JOBS
    from app.jobs.service import run_job
    from app.main import build_services

    name = JobName(args.name)
    if name == JobName.RECONCILE and not settings.stripe_secret_key:
        raise ConfigError("STRIPE_SECRET_KEY is not set: there is no Stripe account to reconcile with")

    async def run(url: str) -> RunOutcome:
        engine = create_engine(settings, url)
        try:
            record = await run_job(build_services(settings, engine), JOBS[name])
        finally:
            await engine.dispose()
        print(msgspec.json.encode(record).decode(), flush=True)
        return RunOutcome(record.outcome)

    with database(settings) as url:
        upgrade(url)
        outcome = asyncio.run(run(url))
    if outcome == RunOutcome.FAILED:
        raise SystemExit(1)


def send_test_event(settings: Settings, args: argparse.Namespace) -> None:
    """Sign a Stripe-shaped event with the first webhook secret and POST it, as Stripe would (the tour)."""
    import json
    import time
    import uuid

    import httpx

    from app.webhooks.signature import signature_header

    if not settings.stripe_webhook_secrets:
        raise ConfigError("STRIPE_WEBHOOK_SECRETS is not set: nothing to sign the event with")
    status = {
        "payment_intent.succeeded": "succeeded",
        "payment_intent.payment_failed": "requires_payment_method",
    }
    event = {
        "id": f"evt_test_{uuid.uuid4().hex}",
        "object": "event",
        "type": args.type,
        "created": int(time.time()),
        "livemode": False,
        "data": {
            "object": {
                "id": args.intent,
                "object": "payment_intent",
                "amount": args.amount,
                "amount_received": args.amount if args.type == "payment_intent.succeeded" else 0,
                "currency": args.currency,
                "status": status.get(args.type, "canceled"),
            }
        },
    }
    body = json.dumps(event).encode()
    header = signature_header(body, settings.stripe_webhook_secrets[0], int(time.time()))
    answer = httpx.post(
        f"{args.url.rstrip('/')}/webhooks/stripe",
        content=body,
        headers={"Stripe-Signature": header, "Content-Type": "application/json"},
    )
    print(answer.status_code, answer.text)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def migrate(settings: Settings, args: argparse.Namespace) -> None:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from app.db.migrate import alembic_config, upgrade

    def refused(exc: CommandError) -> ConfigError:
        return ConfigError(f"--revision {args.revision}: {' '.join(str(exc).split())}")

    # a step relative to the database's revision (+1, -1) can only be resolved once connected
    if not re.search(r"[+-]\d+$", args.revision):
        try:  # a typo is refused before a database is started or reached
            ScriptDirectory.from_config(alembic_config("postgresql://")).get_revisions(args.revision)
        except CommandError as exc:
            raise refused(exc) from None
    with database(settings) as url:
        try:
            upgrade(url, args.revision)
        except CommandError as exc:
            raise refused(exc) from None
    log.info("migrated", extra={"revision": args.revision})


def token(settings: Settings, args: argparse.Namespace) -> None:
    from app.auth import issue_token

    print(issue_token(settings, args.user, admin=args.admin, ttl_s=args.ttl))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one line that names the mistake, like the configuration errors; the usage is one --help away
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _seconds(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {value}")
    return value


def _user_id(raw: str) -> str:
    from app.auth import is_user_id

    if not is_user_id(raw):  # a token the server would always refuse is not printed
        raise argparse.ArgumentTypeError("must be 1-255 printable characters")
    return raw


def _port(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a TCP port (1-65535)")
    return int(raw)


def _processes(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of processes (1-64)")
    return int(raw)


def _port_or_off(raw: str) -> int:
    return 0 if raw == "0" else _port(raw)


def _revision(raw: str) -> str:
    if not raw.strip():
        raise argparse.ArgumentTypeError("must name a revision, such as head")
    return raw


def parser() -> argparse.ArgumentParser:
    data_dir = (
        f"  PAYGUARD_DATA_DIR    data directory of the embedded default (PostgreSQL, generated token\n"
        f"                       secret), default {default_data_dir()}"
    )
    database = "  DATABASE_URL         PostgreSQL to use; unset: PostgreSQL from the wheel, in the data dir"
    secret = (
        "  PAYGUARD_JWT_SECRET  HS256 token secret; unset: generated once into the data directory\n"
        "  PAYGUARD_JWKS_URL    RS256 key set URL, instead of the secret"
    )
    more = "every setting: docs/operations.md"

    def command(name: str, summary: str, *environment: str) -> argparse.ArgumentParser:
        epilog = "\n".join(["environment:", *environment, more])
        return sub.add_parser(
            name, help=summary, description=summary, epilog=epilog, formatter_class=_Formatter
        )

    p = _Parser(
        prog="payguard",
        description="payguard: credits, leads and their payments over HTTP",
        epilog="\n".join(["environment:", database, data_dir, more]),
        formatter_class=_Formatter,
    )
    sub = p.add_subparsers(dest="command", required=True, title="commands")
    s = command(
        "serve",
        "apply migrations, then serve the HTTP API until SIGTERM or SIGINT",
        database,
        data_dir,
        secret,
        "  STRIPE_SECRET_KEY    Stripe API key; unset: payments answer 503",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=8000, help="TCP port to listen on (default 8000)")
    s.add_argument(
        "--processes",
        type=_processes,
        default=1,
        help="serving processes sharing the port, each with its own worker (default 1; about one per core)",
    )
    s.set_defaults(run=serve)
    w = command(
        "worker",
        "handle stored webhook events, send outbox emails and retry failed operations until SIGTERM",
        database,
        data_dir,
        "  SMTP_HOST            outgoing mail server; unset: emails wait in the outbox as held",
        "  PAYGUARD_RETRY_DRIVER local: this worker retries failed operations; kubernetes: the operator does",
    )
    w.add_argument("--metrics-host", default="127.0.0.1", help="address of /metrics (default 127.0.0.1)")
    w.add_argument(
        "--metrics-port", type=_port_or_off, default=9100, help="port of /metrics, 0 for none (default 9100)"
    )
    w.set_defaults(run=worker)
    o = command(
        "operator",
        "mirror failed operations as FailedOperation resources and retry them (Kopf) until SIGTERM",
        database,
        "  PAYGUARD_RETRY_DRIVER must be kubernetes (here and in every worker)",
        "  KUBECONFIG           outside a pod, the cluster and namespace to use (in a pod: its own)",
        "  PAYGUARD_KUBE_NAMESPACE the resources' namespace (default: the pod's, or the context's)",
        "  PAYGUARD_OPERATOR_LIVENESS liveness endpoint (default http://0.0.0.0:8080/healthz)",
    )
    o.set_defaults(run=operator)
    j = command(
        "jobs",
        "run one job once and print its run record: cleanup (every 5 min), health (hourly) or reconcile"
        " (every 10 min); a second run while one holds the job's lock does nothing and exits 0",
        database,
        data_dir,
        "  STRIPE_SECRET_KEY    reconcile asks this Stripe account",
    )
    j.add_argument("name", choices=["cleanup", "health", "reconcile"], help="the job to run")
    j.set_defaults(run=jobs)
    e = command(
        "send-test-event",
        "sign a PaymentIntent event with the webhook secret and POST it to payguard (development aid)",
        "  STRIPE_WEBHOOK_SECRETS the first one signs",
    )
    e.add_argument("--url", default="http://127.0.0.1:8000", help="payguard's base URL (default %(default)s)")
    e.add_argument("--intent", required=True, help="the PaymentIntent id, as the purchase answered it")
    e.add_argument("--amount", type=int, required=True, help="amount in minor units, e.g. 4500")
    e.add_argument("--currency", default="usd", help="lowercase ISO code (default usd)")
    e.add_argument(
        "--type",
        default="payment_intent.succeeded",
        choices=["payment_intent.succeeded", "payment_intent.payment_failed", "payment_intent.canceled"],
        help="event type (default payment_intent.succeeded)",
    )
    e.set_defaults(run=send_test_event)
    m = command("migrate", "apply the database migrations, then exit", database, data_dir)
    m.add_argument(
        "--revision",
        type=_revision,
        default="head",
        help="alembic revision to upgrade to: an id, head, or +N steps (default head)",
    )
    m.set_defaults(run=migrate)
    ttl = Settings().token_ttl_s
    t = command(
        "token",
        "print a bearer token signed with the configured secret (development aid)",
        secret,
        data_dir,
        f"  PAYGUARD_TOKEN_TTL_S default lifetime of the token in seconds, default {ttl}",
    )
    t.add_argument(
        "--user", type=_user_id, required=True, help="user id, the token's sub: 1-255 printable characters"
    )
    t.add_argument("--admin", action="store_true", help="add role admin, which /admin needs (default: off)")
    t.add_argument(
        "--ttl",
        type=_seconds,
        default=None,
        help=f"lifetime in seconds, > 0 (default PAYGUARD_TOKEN_TTL_S, else {ttl})",
    )
    t.set_defaults(run=token)
    return p


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the environment tables' line breaks."""


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    # SIGTERM (Kubernetes, systemd, kill) unwinds like SIGINT does, so every way out stops the embedded
    # PostgreSQL; uvicorn re-raises both after its graceful shutdown
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        args.run(settings, args)
    except KeyboardInterrupt:
        sys.exit(130)
    except ConfigError as exc:
        print(f"payguard: {exc}", file=sys.stderr)
        sys.exit(2)
    except (OSError, DBAPIError) as exc:
        print(f"payguard: cannot reach the database: {exc}", file=sys.stderr)
        sys.exit(1)
