"""Settings: read once from the environment at start-up, then passed down."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import platformdirs


class ConfigError(Exception):
    """The environment names a setting that cannot be used."""


# bounds every numeric setting lives within; a value outside stops the start (exit 2)
Count = Annotated[int, msgspec.Meta(ge=0)]  # 0 means none
Positive = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=86_400)]  # also refuses nan and inf
Milliseconds = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]  # PostgreSQL's timeouts are int4
BigPositive = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]  # fits a BIGINT column
Retention = Annotated[int, msgspec.Meta(ge=60, le=10 * 365 * 86_400)]  # seconds, a minute to ten years
Lifetime = Annotated[int, msgspec.Meta(ge=1, le=10 * 365 * 86_400)]  # seconds, up to ten years
KubeName = Annotated[str, msgspec.Meta(pattern="^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]  # a DNS label
Rate = Annotated[float, msgspec.Meta(ge=0, le=1)]  # a share: 0.05 is 5 %
PortOrOff = Annotated[int, msgspec.Meta(ge=0, le=65535)]  # 0 means none


class CreditPackage(msgspec.Struct, frozen=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]  # purchases.package_id is 64 wide
    credits: BigPositive
    amount: BigPositive  # minor units
    currency: Annotated[str, msgspec.Meta(pattern="^[a-z]{3}$")]  # lowercase ISO 4217, as Stripe writes it


DEFAULT_PACKAGES = (
    CreditPackage("starter", 100, 1_000, "usd"),
    CreditPackage("pro", 500, 4_500, "usd"),
    CreditPackage("business", 2_000, 16_000, "usd"),
)


def default_data_dir() -> Path:
    """Where the embedded default keeps its data when PAYGUARD_DATA_DIR is unset."""
    if os.name == "posix" and os.geteuid() == 0:
        # as root, PostgreSQL runs as another user, which can reach /var/lib/payguard as the system is;
        # under root's home (0700) it could only if that home were opened up to every user
        return Path("/var/lib/payguard")  # the FHS place for a system service's state
    return Path(platformdirs.user_data_dir("payguard"))


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # where the data lives
    database_url: str | None = None
    data_dir: Path = msgspec.field(default_factory=default_data_dir)
    db_pool_size: Positive = 20
    db_max_overflow: Count = 10
    db_pool_timeout_s: Seconds = 10.0  # waiting longer for a connection is a DB timeout
    db_statement_timeout_ms: Milliseconds = 5_000  # a stuck query fails the request, not the pod
    db_lock_timeout_ms: Milliseconds = 3_000

    # auth
    jwt_secret: str | None = None
    jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: Count = 30
    token_ttl_s: Positive = 24 * 3600  # lifetime of tokens printed by `payguard token`
    jwks_timeout_s: Seconds = 5.0  # PyJWT waits 30 s by default, holding the request and a thread that long

    # Stripe
    stripe_secret_key: str | None = None
    stripe_api_base: str | None = None
    stripe_api_version: str | None = None
    stripe_timeout_s: Seconds = 20.0
    stripe_max_network_retries: Count = 2  # the SDK resends with the same idempotency key

    # Stripe webhooks
    stripe_webhook_secrets: tuple[str, ...] = ()  # every one is accepted: rotation
    webhook_tolerance_s: Positive = 300  # a signature older than this is a replay
    webhook_max_body_bytes: Positive = 512 * 1024

    # email
    smtp_host: str | None = None  # unset: emails wait in the outbox as held
    smtp_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 587
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = True
    smtp_timeout_s: Seconds = 15.0
    mail_from: str = "payguard <payguard@localhost>"

    # the worker and the retry engine
    run_worker: bool = True  # `serve` runs the worker too; off where a worker Deployment runs it
    retry_driver: Literal["local", "kubernetes"] = "local"
    worker_batch_size: Positive = 100
    worker_concurrency: Positive = 10  # attempts at once per queue (events: a batch each; each a connection)
    worker_lease_s: Seconds = 60.0  # a killed worker's claims are taken over after this
    worker_poll_interval_s: Seconds = 1.0  # the fallback when no NOTIFY arrives
    email_max_retries: Count = 3
    webhook_max_retries: Count = 5
    retry_base_delay_s: Seconds = 10.0  # first retry after 5-10 s, then doubling
    retry_max_delay_s: Seconds = 3_600.0
    replay_max_events: Positive = 10_000  # one replay request handles at most this many events

    # `payguard operator` (retry_driver kubernetes): FailedOperation resources
    kube_namespace: KubeName | None = None  # the resources' namespace; by default the pod's or the context's
    operator_resync_s: Seconds = 30.0  # how often every mirror is compared with its row
    operator_finished_ttl_s: Lifetime = 86_400  # succeeded and discarded resources are deleted after this
    operator_peering: KubeName = "payguard"  # the KopfPeering object: one active operator replica
    operator_liveness: str = "http://0.0.0.0:8080/healthz"  # the liveness probe's endpoint
    operator_metrics_host: str = "0.0.0.0"  # noqa: S104 (in a pod, Prometheus scrapes the pod's address)
    operator_metrics_port: PortOrOff = 9102  # the operator's /metrics; PayguardOperatorDown watches it

    # idempotency keys
    idempotency_lock_timeout_s: Seconds = 90.0  # a crashed request's lock becomes takeable
    # at least as long as Stripe keeps its own keys (24 h): a client's retry within it is a replay
    idempotency_retention_s: Annotated[int, msgspec.Meta(ge=86_400, le=10 * 365 * 86_400)] = 86_400

    # the jobs (`payguard jobs NAME`, CronJobs; inside `serve` too unless run_jobs is off)
    run_jobs: bool = True
    jobs_batch_size: Positive = 1_000  # rows per statement and transaction, so no job holds locks long
    cleanup_interval_s: Seconds = 300.0  # how often `serve` runs each job in-process
    health_interval_s: Seconds = 3_600.0
    reconcile_interval_s: Seconds = 600.0
    webhook_event_retention_s: Retention = 30 * 86_400  # handled and ignored events; never unfinished ones
    job_run_retention_s: Retention = 30 * 86_400
    health_retention_s: Retention = 90 * 86_400  # platform metrics, and alerts once resolved
    error_log_retention_s: Retention = 90 * 86_400  # error logs, resolved or not
    # the health job: failure rates over a window, an alert above a threshold once enough happened
    health_window_s: Seconds = 3_600.0
    health_min_samples: Positive = 10  # fewer purchases (events, emails) in the window: no alert
    purchase_failure_alert_rate: Rate = 0.05
    webhook_failure_alert_rate: Rate = 0.05
    email_failure_alert_rate: Rate = 0.10
    # reconciliation with Stripe
    reconcile_grace_s: Seconds = 900.0  # a pending intent younger than this may still get its webhook
    reconcile_intent_max_age_s: Retention = 7 * 86_400  # older pending intents are left to the event list
    reconcile_overlap_s: Seconds = 300.0  # each listing starts this long before the last one did
    reconcile_page_size: Annotated[int, msgspec.Meta(ge=1, le=100)] = 100  # Stripe's list limit is 100

    # error logs (POST /v1/errors) and Sentry
    sentry_dsn: str | None = None  # unset: nothing goes to Sentry
    error_max_body_bytes: Positive = 64 * 1024  # a larger error report gets 413

    # HTTP
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    max_body_bytes: Positive = 64 * 1024
    # uvicorn (httptools) takes headers of any size and number; a browser sends a few KiB
    max_header_bytes: Positive = 32 * 1024  # names, values, ": " and CRLF, all headers together
    max_header_count: Positive = 100

    # reservations
    reservation_ttl_s: Positive = 900  # how long a hold lasts
    reservation_max_quantity: Positive = 20  # tickets per hold

    # rate limits: requests per window, per user and action
    rate_window_s: Positive = 60
    rate_credit_purchases: Positive = 10
    rate_lead_purchases: Positive = 60
    rate_reservations: Positive = 30  # holds
    rate_error_reports: Positive = 60

    credit_packages: tuple[CreditPackage, ...] = DEFAULT_PACKAGES

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    def package(self, package_id: str) -> CreditPackage | None:
        return next((p for p in self.credit_packages if p.id == package_id), None)


# environment variable -> Settings field; API.md fixes the names of the first group
ENV_VARS: dict[str, str] = {
    "DATABASE_URL": "database_url",
    "PAYGUARD_DATA_DIR": "data_dir",
    "PAYGUARD_JWT_SECRET": "jwt_secret",
    "PAYGUARD_JWKS_URL": "jwks_url",
    "STRIPE_SECRET_KEY": "stripe_secret_key",
    "STRIPE_API_BASE": "stripe_api_base",
    "STRIPE_API_VERSION": "stripe_api_version",
    "STRIPE_WEBHOOK_SECRETS": "stripe_webhook_secrets",
    "SMTP_HOST": "smtp_host",
    "SMTP_PORT": "smtp_port",
    "SMTP_USERNAME": "smtp_username",
    "SMTP_PASSWORD": "smtp_password",
    "SMTP_STARTTLS": "smtp_starttls",
    "MAIL_FROM": "mail_from",
    "SENTRY_DSN": "sentry_dsn",
}
# API.md's OTEL_* become settings with the code that reads them, not before
# every other field is PAYGUARD_<FIELD> (PAYGUARD_RATE_LEAD_PURCHASES, ...)
for _field in msgspec.structs.fields(Settings):
    if _field.name not in ENV_VARS.values():
        ENV_VARS[f"PAYGUARD_{_field.name.upper()}"] = _field.name
_VAR_OF = {field: var for var, field in ENV_VARS.items()}


def _coerce(var: str, field: str, raw: str) -> Any:
    if field == "credit_packages":
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{var} is not valid JSON ({exc}); expected a list of packages") from None
    if field == "log_level":
        return raw.upper()
    if field == "stripe_webhook_secrets":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from the environment; `overrides` win (tests, CLI flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {
        field: _coerce(var, field, environ[var]) for var, field in ENV_VARS.items() if environ.get(var)
    }
    values.update(overrides)
    try:
        settings = msgspec.convert(values, Settings, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(_name_the_variable(str(exc))) from None
    _check(settings)
    return settings


def _name_the_variable(message: str) -> str:
    """msgspec's "Expected `int` >= 1 - at `$.db_pool_size`" as "PAYGUARD_DB_POOL_SIZE: expected ..."."""
    what, sep, where = message.rpartition(" - at `$.")
    found = re.match(r"\w+", where) if sep else None
    if found is None:
        return f"invalid configuration: {message}"
    field = found.group()
    return f"{_VAR_OF.get(field, field)}{where[len(field) :].rstrip('`')}: {what[:1].lower()}{what[1:]}"


def _dec_hook(type_: type, value: Any) -> Any:
    if type_ is Path:
        return Path(value)
    raise NotImplementedError


def _check(s: Settings) -> None:
    ids = [p.id for p in s.credit_packages]
    if repeated := sorted({i for i in ids if ids.count(i) > 1}):
        raise ConfigError(f"PAYGUARD_CREDIT_PACKAGES: package ids must be unique; repeated: {repeated}")
    if s.database_url is not None and not s.database_url.startswith(("postgresql", "postgres")):
        raise ConfigError("DATABASE_URL must be a PostgreSQL URL")
