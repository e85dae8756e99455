"""The chart's Grafana dashboards: well-formed, built only on metrics payguard exports, rendered as
ConfigMaps the Grafana sidecar picks up. (Each query run against a real Prometheus: the alerts' suite.)"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import app
import payguard_operator
from app.observability import metrics
from tests.fixtures.dashboards import dashboard_files, load, panel_queries, panels
from tests.fixtures.tools import kube_tools

CHART = Path(__file__).parents[2] / "charts" / "payguard"
METRIC_TOKEN = re.compile(r"\bpayguard_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(payguard_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# what prometheus_client serves for each family type, after the family's name
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}
# labels a scrape adds (ServiceMonitor: namespace; job's own label becomes exported_job) and histogram's le
SCRAPE_LABELS = {"namespace", "job", "instance", "pod", "service", "exported_job", "le"}


@functools.cache
def exported() -> dict[str, tuple[str, ...]]:
    """Sample names served on /metrics by anything defined in app/ or operator/, with their labels."""
    for package in (app, payguard_operator):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    labels = {
        m._name: tuple(m._labelnames) for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)
    }
    served: dict[str, tuple[str, ...]] = {}
    for family in REGISTRY.collect():
        if family.name.startswith("payguard_"):
            for suffix in SUFFIXES[family.type]:
                served[family.name + suffix] = labels.get(family.name, ())
    return served


QUERIES = panel_queries()


def test_the_chart_ships_dashboards() -> None:
    names = {p.name for p in dashboard_files()}
    assert {"payguard-overview.json", "payguard-money-flows.json", "payguard-queues-jobs.json"} <= names


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Path) -> None:
    board = load(path)
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    for panel in panels(board):
        if panel.get("type") == "row":
            continue
        where = f"{path.name} panel {panel['id']}"
        assert panel.get("title"), f"{where} has no title"
        assert panel["datasource"]["uid"] == "${datasource}", f"{where} does not use the datasource variable"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), f"{where} has an empty query"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{where} repeats a refId"


def test_dashboard_uids_are_unique() -> None:
    uids = [load(p)["uid"] for p in dashboard_files()]
    assert len(uids) == len(set(uids)), uids


@pytest.mark.parametrize("query", QUERIES, ids=str)
def test_query_uses_only_exported_metrics(query: Any) -> None:
    served = exported()
    used = set(METRIC_TOKEN.findall(query.expr))
    assert used, f"{query}: no payguard metric in {query.expr!r}"
    unknown = used - served.keys()
    assert not unknown, f"{query}: not exported by payguard: {sorted(unknown)} (known: {sorted(served)})"
    known_labels = SCRAPE_LABELS.union(*(served[name] for name in used))
    for name, matchers in SELECTOR.findall(query.expr):
        for label in MATCHER.findall(matchers):
            assert label in SCRAPE_LABELS or label in served[name], f"{query}: {name} has no label {label}"
    for group in BY.findall(query.expr):
        for label in filter(None, (s.strip() for s in group.split(","))):
            assert label in known_labels, f"{query}: no metric it uses has the label {label}"


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every query (as a recording rule) with Grafana's variables filled in."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: apt-get install prometheus"
    rules = [{"record": f"dashboard:panel_{i}", "expr": q.promql()} for i, q in enumerate(QUERIES)]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    leftover = [str(q) for q in QUERIES if "$" in q.promql().replace('"$1"', "")]
    assert not leftover, f"variables left unfilled in {leftover}"


def _render(*sets: str) -> list[dict[str, Any]]:
    helm = kube_tools() / "helm"
    args = [str(helm), "template", "payguard", str(CHART), "--namespace", "payguard"]
    args += ["--show-only", "templates/dashboards.yaml"]
    for value in sets:
        args += ["--set", value]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_each_dashboard_is_a_configmap_with_the_sidecar_label() -> None:
    maps = _render("dashboards.annotations.grafana_folder=Payments")
    files = {p.name: p for p in dashboard_files()}
    by_file = {}
    for cm in maps:
        assert cm["kind"] == "ConfigMap"
        meta = cm["metadata"]
        assert meta["labels"]["grafana_dashboard"] == "1"
        assert meta["labels"]["app.kubernetes.io/instance"] == "payguard"
        assert meta["annotations"] == {"grafana_folder": "Payments"}
        ((key, text),) = cm["data"].items()
        by_file[key] = text
    assert by_file.keys() == files.keys()
    for name, text in by_file.items():
        assert json.loads(text) == load(files[name]), f"{name} changed on its way into the ConfigMap"
    assert len({cm["metadata"]["name"] for cm in maps}) == len(maps)


def test_sidecar_label_and_switch_come_from_values() -> None:
    maps = _render("dashboards.sidecarLabel=my_dashboards", "dashboards.sidecarLabelValue=yes")
    assert maps and all(cm["metadata"]["labels"]["my_dashboards"] == "yes" for cm in maps)
    assert all("grafana_dashboard" not in cm["metadata"]["labels"] for cm in maps)
    assert all("annotations" not in cm["metadata"] for cm in maps)
    helm = kube_tools() / "helm"
    off = subprocess.run(
        [str(helm), "template", "payguard", str(CHART), "--set", "dashboards.enabled=false"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert off.returncode == 0, off.stderr
    rendered = [doc for doc in yaml.safe_load_all(off.stdout) if doc]
    assert not [doc for doc in rendered if any(k.endswith(".json") for k in doc.get("data") or {})]
