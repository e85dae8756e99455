"""Every Grafana panel's query runs on the live Prometheus, scraping a payguard that has done a little of
everything, without error and with at least one series. (No Grafana server can be installed here; the
panels' queries are what a dashboard is made of.) Grafana's variables become what "All" would select."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.alerting import LiveStack, traffic
from tests.fixtures.prometheus import CHART

pytestmark = pytest.mark.timeout(120)

DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
# Grafana's interval variables, as a 1-minute dashboard range would set them
INTERVALS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1m", "__range_s": "60", "__range_ms": "60000", "__interval_ms": "60000"}  # fmt: skip
# a Grafana variable starts with a letter or _: `$1` is a PromQL regex group (label_replace)
_VARIABLE = r"\$\{?([A-Za-z_]\w*)(?::\w+)?\}?|\[\[(\w+)\]\]"
_MATCHER = re.compile(rf'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*(?:{_VARIABLE})[^"]*)"')


def concrete(expr: str) -> str:
    """`expr` as Grafana would send it with every template variable on All: a matcher naming a variable
    matches anything, and the interval variables are a minute."""
    expr = _MATCHER.sub(lambda m: f'{m.group(1)}=~".*"', expr)
    expr = re.sub(_VARIABLE, lambda m: INTERVALS.get(m.group(1) or m.group(2), m.group(0)), expr)
    leftover = re.search(r"\$\{?[A-Za-z_]|\[\[", expr)
    assert leftover is None, f"a variable used outside a label matcher: {expr}"
    return expr


def panels(nodes: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows (collapsed ones keep theirs in `panels`) included."""
    for node in nodes:
        yield node
        yield from panels(node.get("panels", []))


def queries(path: Path) -> Iterator[tuple[str, str]]:
    dashboard = json.loads(path.read_text())
    rows = [p for row in dashboard.get("rows", []) for p in row.get("panels", [])]  # the old schema
    for panel in panels([*dashboard.get("panels", []), *rows]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"{path.name}: {panel.get('title', '?')} [{target.get('refId', '?')}]", target["expr"]


QUERIES = [q for path in DASHBOARDS for q in queries(path)]


def test_there_are_dashboards_with_queries() -> None:
    # written in charts/payguard/dashboards/ by the dashboards part of this issue
    assert DASHBOARDS, f"no dashboard in {CHART / 'dashboards'}"
    assert QUERIES


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ('sum(rate(payguard_http_requests_total{namespace="$namespace", job=~"$job"}[$__rate_interval]))',
         'sum(rate(payguard_http_requests_total{namespace=~".*", job=~".*"}[1m]))'),
        ('increase(x{pod=~"${pod:regex}", route!="[[route]]"}[$__range])', 'increase(x{pod=~".*", route=~".*"}[1m])'),
        ("max(x) by (queue)", "max(x) by (queue)"),
    ],
)  # fmt: skip
def test_variables_become_what_all_selects(given: str, sent: str) -> None:
    assert concrete(given) == sent


def test_a_variable_outside_a_matcher_is_refused() -> None:
    with pytest.raises(AssertionError, match="outside a label matcher"):
        concrete("topk($n, x)")


@pytest.fixture(scope="module")
async def busy(live: LiveStack) -> AsyncIterator[LiveStack]:
    async with traffic(live):
        yield live


@pytest.mark.parametrize(("panel", "expr"), QUERIES, ids=[name for name, _ in QUERIES])
async def test_every_panel_query_runs_and_returns_series(busy: LiveStack, panel: str, expr: str) -> None:
    result = busy.prometheus.query(concrete(expr))
    assert result, f"{panel}: no series for {concrete(expr)}"
