"""`payguard` at a terminal: a mistake gets exit 2 and one line that names it, never a traceback."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from tests.fixtures.serve import assert_usage_error, postgres_running, run


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("PAYGUARD_CREDIT_PACKAGES", "not json"),
        (
            "PAYGUARD_CREDIT_PACKAGES",
            '[{"id": "x", "credits": 1, "amount": 5, "currency": "usd"}, '
            '{"id": "x", "credits": 2, "amount": 9, "currency": "usd"}]',
        ),
        ("PAYGUARD_DB_POOL_SIZE", "-3"),
        ("PAYGUARD_DB_POOL_TIMEOUT_S", "-1"),
        ("PAYGUARD_MAX_BODY_BYTES", "-1"),
        ("PAYGUARD_TOKEN_TTL_S", "-5"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(tmp_path: Path, var: str, value: str) -> None:
    result = run(tmp_path / "data", "token", "--user", "u1", **{var: value})
    assert_usage_error(result, var)


def test_migrate_to_an_unknown_revision_is_one_line_and_exit_2(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = run(data_dir, "migrate", "--revision", "nonsense")
    assert_usage_error(result, "nonsense")
    assert not postgres_running(data_dir)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["token", "--user", "u1", "--ttl", "0"], "--ttl"),  # would print a token that is already expired
        (["token", "--user", "u1", "--ttl", "-60"], "--ttl"),
        (["token", "--user", "u1", "--ttl", "soon"], "--ttl"),
        (["token", "--user", ""], "--user"),  # the server refuses an empty sub
        (["token", "--user", "u\t1"], "--user"),
        (["token", "--user", "u" * 256], "--user"),
        (["token"], "--user"),
        (["migrate", "--revision", ""], "--revision"),
        (["serve", "--port", "70000"], "--port"),
        (["launch"], "launch"),
    ],
    ids=[
        "ttl-0",
        "ttl-negative",
        "ttl-word",
        "user-empty",
        "user-tab",
        "user-long",
        "no-user",
        "revision-empty",
        "port",
        "command",
    ],
)
def test_a_bad_argument_is_one_line_and_exit_2(tmp_path: Path, args: list[str], named: str) -> None:
    result = run(tmp_path / "data", *args, timeout=30)
    assert_usage_error(result, named)
    assert not (tmp_path / "data").exists()  # refused before anything was touched


def test_token_lives_as_long_as_asked(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    flag = run(data_dir, "token", "--user", "u1", "--ttl", "60")
    setting = run(data_dir, "token", "--user", "u1", "--admin", PAYGUARD_TOKEN_TTL_S="120")
    default = run(data_dir, "token", "--user", "u1")
    lifetimes = []
    for result in (flag, setting, default):
        assert result.returncode == 0, result.stderr
        claims = jwt.decode(result.stdout.strip(), options={"verify_signature": False})
        assert claims["sub"] == "u1"
        lifetimes.append(claims["exp"] - claims["iat"])
    assert lifetimes == [60, 120, 24 * 3600]
