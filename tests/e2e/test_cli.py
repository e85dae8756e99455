"""`payguard` at a terminal: a mistake gets exit 2 and one line that names it, never a traceback."""

from __future__ import annotations

from pathlib import Path

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
