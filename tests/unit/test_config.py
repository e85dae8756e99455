"""Settings: every field has a reader, and a bad value stops the start with one clear message."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, get_args, get_origin

import msgspec
import pytest

from app.config import ENV_VARS, ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"
OPERATOR = ROOT / "operator"


def test_every_setting_is_read_by_the_app() -> None:
    # a setting nobody reads promises behaviour that does not exist (no setting without a reader)
    readers = [*APP.rglob("*.py"), *OPERATOR.rglob("*.py")]
    source = "\n".join(p.read_text(encoding="utf-8") for p in readers if p != APP / "config.py")
    unread = [f.name for f in msgspec.structs.fields(Settings) if not re.search(rf"\.{f.name}\b", source)]
    assert unread == []


def _env_var(field: str) -> str:
    return next(var for var, name in ENV_VARS.items() if name == field)


def _base_type(t: object) -> object:
    return get_args(t)[0] if get_origin(t) is Annotated else t


NUMERIC = [f.name for f in msgspec.structs.fields(Settings) if _base_type(f.type) in (int, float)]


def test_the_numeric_settings_are_found() -> None:
    assert {"db_pool_size", "db_pool_timeout_s", "token_ttl_s", "max_body_bytes"} <= set(NUMERIC)


@pytest.mark.parametrize("field", NUMERIC)
def test_every_numeric_setting_refuses_a_negative_value(field: str) -> None:
    var = _env_var(field)
    with pytest.raises(ConfigError) as caught:
        load_settings({var: "-1"})
    message = str(caught.value)
    assert var in message and "\n" not in message


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("PAYGUARD_DB_POOL_SIZE", "0"),
        ("PAYGUARD_DB_POOL_TIMEOUT_S", "0"),
        ("PAYGUARD_DB_POOL_TIMEOUT_S", "nan"),
        ("PAYGUARD_DB_POOL_TIMEOUT_S", "inf"),
        ("PAYGUARD_DB_STATEMENT_TIMEOUT_MS", "0"),  # 0 would switch PostgreSQL's timeout off
        ("PAYGUARD_DB_STATEMENT_TIMEOUT_MS", "2147483648"),  # PostgreSQL's int limit
        ("PAYGUARD_DB_LOCK_TIMEOUT_MS", "0"),
        ("PAYGUARD_TOKEN_TTL_S", "0"),
        ("PAYGUARD_STRIPE_TIMEOUT_S", "0"),
        ("PAYGUARD_WORKER_BATCH_SIZE", "0"),
        ("PAYGUARD_IDEMPOTENCY_LOCK_TIMEOUT_S", "0"),
        ("PAYGUARD_MAX_BODY_BYTES", "0"),
        ("PAYGUARD_RATE_WINDOW_S", "0"),
        ("PAYGUARD_RATE_CREDIT_PURCHASES", "0"),
        ("PAYGUARD_RATE_LEAD_PURCHASES", "0"),
        ("PAYGUARD_DB_POOL_SIZE", "many"),
        ("PAYGUARD_LOG_LEVEL", "loud"),
        ("DATABASE_URL", "mysql://db/x"),
    ],
)
def test_out_of_range_values_stop_the_start_with_one_line(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({var: value})
    message = str(caught.value)
    assert var in message and "\n" not in message


def test_zero_is_accepted_where_it_means_none() -> None:
    s = load_settings(
        {
            "PAYGUARD_DB_MAX_OVERFLOW": "0",
            "PAYGUARD_STRIPE_MAX_NETWORK_RETRIES": "0",
            "PAYGUARD_JWT_LEEWAY_S": "0",
            "PAYGUARD_LOG_LEVEL": "debug",
        }
    )
    assert (s.db_max_overflow, s.stripe_max_network_retries, s.jwt_leeway_s) == (0, 0, 0)
    assert s.log_level == "DEBUG"


def test_credit_packages_that_are_not_json_are_one_clear_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"PAYGUARD_CREDIT_PACKAGES": "not json"})
    message = str(caught.value)
    assert "PAYGUARD_CREDIT_PACKAGES" in message and "JSON" in message and "\n" not in message


def _package(**changes: object) -> dict[str, object]:
    return {"id": "x", "credits": 1, "amount": 50, "currency": "eur", **changes}


@pytest.mark.parametrize(
    "packages",
    [
        [_package(), _package(credits=2)],  # the same id twice: which one is sold?
        [_package(id="")],
        [_package(id="x" * 65)],  # longer than the purchases.package_id column
        [_package(credits=0)],
        [_package(amount=-1)],
        [_package(currency="EUR")],
        [_package(currency="euro")],
        {"id": "x"},
    ],
    ids=["duplicate-id", "empty-id", "long-id", "no-credits", "negative-amount", "upper", "four", "object"],
)
def test_bad_credit_packages_are_refused(packages: object) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"PAYGUARD_CREDIT_PACKAGES": json.dumps(packages)})
    assert "PAYGUARD_CREDIT_PACKAGES" in str(caught.value)


def test_good_credit_packages_are_read() -> None:
    s = load_settings({"PAYGUARD_CREDIT_PACKAGES": json.dumps([_package(), _package(id="y")])})
    assert [p.id for p in s.credit_packages] == ["x", "y"]
