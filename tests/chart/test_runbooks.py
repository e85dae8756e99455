"""Runbooks stay true: one per alert, each with its sections, its SQL valid on the migrated schema, its
admin API calls on routes that exist and its payguard commands real."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import pytest

from app.cli import parser
from app.config import load_settings
from app.db.models import metadata
from app.main import create_app

RUNBOOKS = Path(__file__).parents[2] / "docs" / "runbooks"
# the alerts of the chart's PrometheusRule and their values keys (the values contract of issue 13)
ALERTS = {
    "PayguardPurchaseFailureRateHigh": "purchaseFailureRate",
    "PayguardWebhookFailureRateHigh": "webhookFailureRate",
    "PayguardHTTP5xxRateHigh": "http5xxRate",
    "PayguardDatabaseTimeouts": "dbTimeouts",
    "PayguardEmailFailureRateHigh": "emailFailureRate",
    "PayguardPurchaseConflictsHigh": "purchaseConflictRate",
    "PayguardWebhookSignatureRejections": "webhookSignatureRejections",
    "PayguardWebhookProcessingLag": "webhookLag",
    "PayguardQueueStalled": "queueStalled",
    "PayguardReconcileFoundMissedEvents": "reconcileMissedEvents",
    "PayguardFailedOperationsDead": "failedOperationsDead",
    "PayguardFailedOperationsPendingTooLong": "failedOperationsPendingAge",
    "PayguardCleanupJobStale": "cleanupJobStale",
    "PayguardHealthJobStale": "healthJobStale",
    "PayguardReconcileJobStale": "reconcileJobStale",
    "PayguardReservationHoldsStale": "reservationHoldsStale",
    "PayguardAPILatencyHigh": "apiLatencyP99",
    "PayguardRateLimitedSpike": "rateLimitedSpike",
    "PayguardOperatorDown": "operatorDown",
    "PayguardEmailsHeldNoSMTP": "emailsHeld",
}
SECTIONS = ("## What it means", "## How to look", "## How to fix")
SQL_BLOCK = re.compile(r"```sql\n(.*?)```", re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
TABLE = re.compile(r"\b(?:FROM|JOIN|UPDATE|INTO)\s+([a-z_][a-z0-9_]*)", re.I)
API_PATH = re.compile(r"/(?:admin|v1)/[A-Za-z0-9_{}.\-/]*[A-Za-z0-9_}]")
COMMAND = re.compile(r"(?:^|\$\(|-- )payguard ([a-z][a-z-]*)", re.M)


def _pages() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(RUNBOOKS.glob("*.md")) if p.name != "README.md"}


def _statements(text: str) -> list[str]:
    """Every SQL statement on a page: fenced sql blocks, and inline code that starts with SELECT."""
    found = [s.strip() for block in SQL_BLOCK.findall(text) for s in block.split(";") if s.strip()]
    found += [c.rstrip(";") for c in INLINE_CODE.findall(text) if c.upper().startswith("SELECT ")]
    return found


def _pages_and_index() -> dict[str, str]:
    return {**_pages(), "README": (RUNBOOKS / "README.md").read_text()}


def _all_statements() -> list[tuple[str, str]]:
    return [(name, sql) for name, text in _pages().items() for sql in _statements(text)]


def test_every_alert_has_a_runbook_and_nothing_else_is_there() -> None:
    assert set(_pages()) == set(ALERTS)
    index = (RUNBOOKS / "README.md").read_text()
    for name, key in ALERTS.items():
        assert f"]({name}.md)" in index and f"`{key}`" in index, f"README.md does not list {name}"


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_runbook_has_its_sections(name: str) -> None:
    text = (RUNBOOKS / f"{name}.md").read_text()
    assert text.startswith(f"# {name}\n")
    positions = [text.find(section + "\n") for section in SECTIONS]
    assert all(p > 0 for p in positions) and positions == sorted(positions), f"{name}: sections {SECTIONS}"
    assert f"`alerts.{ALERTS[name]}`" in text, f"{name} does not name its values key"
    assert 30 <= text.count("\n") <= 70, f"{name} is {text.count(chr(10))} lines: keep it short and whole"


def test_sql_names_only_tables_of_the_schema() -> None:
    tables = set(metadata.tables)
    assert _all_statements(), "no SQL found: the parser is broken"
    for name, sql in _all_statements():
        for table in TABLE.findall(sql):
            known = table in tables or table.startswith("pg_")  # PostgreSQL's own catalogs and views
            assert known, f"{name}: no table {table!r} in the schema ({sorted(tables)}): {sql}"


async def test_sql_plans_on_the_migrated_schema(db: asyncpg.Connection) -> None:
    """EXPLAIN each statement: a wrong column, type or function fails here, and nothing is executed."""
    for name, sql in _all_statements():
        try:
            await db.execute(f"EXPLAIN {sql}")
        except asyncpg.PostgresError as exc:
            pytest.fail(f"{name}: {exc.__class__.__name__}: {exc}\n{sql}")


def _routes() -> list[tuple[re.Pattern[str], set[str]]]:
    settings = load_settings({}, database_url="postgresql://127.0.0.1:1/none", jwt_secret="x" * 48)
    app = create_app(settings, "postgresql://127.0.0.1:1/none")  # builds the routes; connects to nothing
    return [
        (re.compile("^" + re.sub(r"\\\{[^/]*\\\}", "[^/]+", re.escape(r.path)) + "$"), set(r.methods))
        for r in app.routes
        if hasattr(r, "methods")
    ]


def test_admin_api_calls_exist() -> None:
    routes = _routes()
    seen = 0
    for name, text in _pages_and_index().items():
        for line in text.splitlines():
            method = "POST" if re.search(r"-X ?POST\b", line) else None
            for path in API_PATH.findall(line):
                seen += 1
                matches = [methods for pattern, methods in routes if pattern.match(path)]
                assert matches, f"{name}: no route {path}"
                if method:
                    assert any(method in m for m in matches), f"{name}: {path} takes no {method}"
    assert seen > 20, "no API paths found: the parser is broken"


def test_payguard_commands_exist() -> None:
    commands = set(parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    used = {(name, c) for name, text in _pages_and_index().items() for c in COMMAND.findall(text)}
    assert used, "no payguard command found: the parser is broken"
    unknown = sorted((name, c) for name, c in used if c not in commands)
    assert not unknown, f"not a payguard command: {unknown} (there are {sorted(commands)})"
