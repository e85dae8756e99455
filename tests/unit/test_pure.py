"""Pure logic: settings, key and cursor validation, fingerprints, log lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from app.config import ConfigError, load_settings
from app.db.engine import asyncpg_url
from app.idempotency.service import KeyedRequest, check_key
from app.observability.logging import JsonFormatter, request_id
from app.pagination import MAX_ID, parse_cursor
from app.problems import IdempotencyKeyInvalid, IdempotencyKeyRequired, InvalidCursor


def test_settings_from_the_environment() -> None:
    s = load_settings(
        {
            "DATABASE_URL": "postgresql://u:p@db/pay",
            "PAYGUARD_DATA_DIR": "/tmp/pg-data",
            "PAYGUARD_RATE_LEAD_PURCHASES": "7",
            "PAYGUARD_IDEMPOTENCY_LOCK_TIMEOUT_S": "2.5",
            "PAYGUARD_CREDIT_PACKAGES": '[{"id": "x", "credits": 1, "amount": 50, "currency": "eur"}]',
        }
    )
    assert s.database_url == "postgresql://u:p@db/pay" and not s.embedded
    assert s.data_dir == Path("/tmp/pg-data")
    assert s.rate_lead_purchases == 7 and s.idempotency_lock_timeout_s == 2.5
    assert s.package("x") is not None and s.package("starter") is None


def test_defaults_are_safe() -> None:
    s = load_settings({})
    assert s.embedded and s.stripe_secret_key is None
    assert (s.email_max_retries, s.webhook_max_retries) == (3, 5)
    assert s.stripe_webhook_secrets == () and s.smtp_host is None and s.retry_driver == "local"


@pytest.mark.parametrize(
    "env",
    [
        {"PAYGUARD_RATE_LEAD_PURCHASES": "many"},
        {"PAYGUARD_RATE_LEAD_PURCHASES": "0"},
        {"DATABASE_URL": "mysql://db/x"},
        {"PAYGUARD_CREDIT_PACKAGES": '[{"id": "x", "credits": 1, "amount": 50, "currency": "EURO"}]'},
    ],
)
def test_bad_settings_fail_at_start(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_settings(env)


def test_urls_are_normalised_to_asyncpg() -> None:
    assert asyncpg_url("postgres://u:p@h:5/db") == "postgresql+asyncpg://u:p@h:5/db"
    socket_url = make_url(asyncpg_url("postgresql://postgres@/x?host=/run/pg"))
    assert socket_url.drivername == "postgresql+asyncpg" and socket_url.query["host"] == "/run/pg"


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=255))
def test_printable_ascii_keys_are_accepted(key: str) -> None:
    assert check_key(key, required=True) == key


@given(st.text(min_size=1, max_size=300))
def test_other_keys_are_refused(key: str) -> None:
    ok = len(key) <= 255 and all(" " <= c <= "~" for c in key)
    if ok:
        assert check_key(key, required=True) == key
    else:
        with pytest.raises(IdempotencyKeyInvalid):
            check_key(key, required=True)


def test_missing_key() -> None:
    with pytest.raises(IdempotencyKeyRequired):
        check_key(None, required=True)
    assert check_key(None, required=False) is None


@given(st.integers(min_value=1, max_value=MAX_ID))
def test_cursors_round_trip(n: int) -> None:
    assert parse_cursor(str(n)) == n


@given(st.text(max_size=30))
def test_bad_cursors_are_refused(text: str) -> None:
    if text.isascii() and text.isdigit() and 0 < int(text) <= MAX_ID:
        assert parse_cursor(text) == int(text)
    else:
        with pytest.raises(InvalidCursor):
            parse_cursor(text)


def test_fingerprint_binds_method_path_and_body() -> None:
    base = KeyedRequest("u", "k", "POST", "/v1/x", b'{"a":1}')
    assert base.fingerprint() == KeyedRequest("other-user", "k2", "POST", "/v1/x", b'{"a":1}').fingerprint()
    assert base.fingerprint() != KeyedRequest("u", "k", "POST", "/v1/y", b'{"a":1}').fingerprint()
    assert base.fingerprint() != KeyedRequest("u", "k", "POST", "/v1/x", b'{"a":2}').fingerprint()
    assert base.fingerprint() != KeyedRequest("u", "k", "PUT", "/v1/x", b'{"a":1}').fingerprint()


def test_log_lines_are_json_with_the_request_id() -> None:
    record = logging.LogRecord("payguard.x", logging.INFO, __file__, 1, "charged %s", ("u1",), None)
    record.amount = 500
    token = request_id.set("rid-1")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token)
    assert line["msg"] == "charged u1" and line["request_id"] == "rid-1" and line["amount"] == 500
    assert line["level"] == "info" and line["logger"] == "payguard.x"
