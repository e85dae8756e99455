"""Settings: read once from the environment at start-up, then passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import platformdirs


class ConfigError(Exception):
    """The environment names a setting that cannot be used."""


class CreditPackage(msgspec.Struct, frozen=True):
    id: str
    credits: int
    amount: int  # minor units
    currency: str  # lowercase ISO 4217, as Stripe writes it


DEFAULT_PACKAGES = (
    CreditPackage("starter", 100, 1_000, "usd"),
    CreditPackage("pro", 500, 4_500, "usd"),
    CreditPackage("business", 2_000, 16_000, "usd"),
)


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # where the data lives
    database_url: str | None = None
    data_dir: Path = Path(platformdirs.user_data_dir("payguard"))
    db_pool_size: int = 20
    db_max_overflow: int = 10
    db_pool_timeout_s: float = 10.0  # waiting longer for a connection is a DB timeout
    db_statement_timeout_ms: int = 5_000  # a stuck query fails the request, not the pod
    db_lock_timeout_ms: int = 3_000

    # auth
    jwt_secret: str | None = None
    jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: int = 30
    token_ttl_s: int = 24 * 3600  # lifetime of tokens printed by `payguard token`

    # Stripe
    stripe_secret_key: str | None = None
    stripe_api_base: str | None = None
    stripe_api_version: str | None = None
    stripe_timeout_s: float = 20.0
    stripe_max_network_retries: int = 2  # the SDK resends with the same idempotency key

    # email
    email_max_attempts: int = 3

    # idempotency keys
    idempotency_lock_timeout_s: float = 90.0  # a crashed request's lock becomes takeable

    # HTTP
    log_level: str = "INFO"
    max_body_bytes: int = 64 * 1024

    # rate limits: requests per window, per user and action
    rate_window_s: int = 60
    rate_credit_purchases: int = 10
    rate_lead_purchases: int = 60

    credit_packages: tuple[CreditPackage, ...] = DEFAULT_PACKAGES

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    def package(self, package_id: str) -> CreditPackage | None:
        return next((p for p in self.credit_packages if p.id == package_id), None)


# environment variable -> Settings field; API.md fixes the names of the first group
_ENV: dict[str, str] = {
    "DATABASE_URL": "database_url",
    "PAYGUARD_DATA_DIR": "data_dir",
    "PAYGUARD_JWT_SECRET": "jwt_secret",
    "PAYGUARD_JWKS_URL": "jwks_url",
    "STRIPE_SECRET_KEY": "stripe_secret_key",
    "STRIPE_API_BASE": "stripe_api_base",
    "STRIPE_API_VERSION": "stripe_api_version",
}
# API.md's STRIPE_WEBHOOK_SECRETS, SMTP_*, MAIL_FROM, PAYGUARD_RETRY_DRIVER, OTEL_* and SENTRY_DSN become
# settings with the code that reads them (webhook and worker issues), not before
# every other field is PAYGUARD_<FIELD> (PAYGUARD_RATE_LEAD_PURCHASES, ...)
for _field in msgspec.structs.fields(Settings):
    if _field.name not in _ENV.values():
        _ENV[f"PAYGUARD_{_field.name.upper()}"] = _field.name


def _coerce(name: str, raw: str) -> Any:
    if name == "credit_packages":
        return msgspec.json.decode(raw)
    return raw


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from the environment; `overrides` win (tests, CLI flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {
        field: _coerce(field, environ[var]) for var, field in _ENV.items() if environ.get(var)
    }
    values.update(overrides)
    try:
        settings = msgspec.convert(values, Settings, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    _check(settings)
    return settings


def _dec_hook(type_: type, value: Any) -> Any:
    if type_ is Path:
        return Path(value)
    raise NotImplementedError


def _check(s: Settings) -> None:
    for p in s.credit_packages:
        if p.credits <= 0 or p.amount <= 0 or len(p.currency) != 3 or not p.currency.islower():
            raise ConfigError(f"credit package {p.id!r}: credits and amount > 0, currency like 'usd'")
    for name in ("rate_window_s", "rate_credit_purchases", "rate_lead_purchases"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    if s.database_url is not None and not s.database_url.startswith(("postgresql", "postgres")):
        raise ConfigError("DATABASE_URL must be a PostgreSQL URL")
