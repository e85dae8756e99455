"""The chart's alerts as data: rendered by helm, checked and unit-tested by promtool (every alert fires
above its threshold and stays silent just below), every threshold a value, every alert with a runbook;
and the Slack routing the chart renders for Alertmanager."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.alerting import FAST_ROUTING
from tests.fixtures.prometheus import (
    CHART,
    MONITORED,
    HelmError,
    alert_rules,
    alertmanager_config,
    helm_template,
    of_kind,
    require_binary,
    write_rules,
)

ROOT = Path(__file__).resolve().parents[2]
UNIT_TESTS = CHART / "tests" / "rules"
RUNBOOKS = "https://github.com/payguard/payguard/blob/main/docs/runbooks"
# the contract: alert name -> (values key, severity)
ALERTS = {
    "PayguardPurchaseFailureRateHigh": ("purchaseFailureRate", "critical"),
    "PayguardWebhookFailureRateHigh": ("webhookFailureRate", "critical"),
    "PayguardHTTP5xxRateHigh": ("http5xxRate", "error"),
    "PayguardDatabaseTimeouts": ("dbTimeouts", "error"),
    "PayguardEmailFailureRateHigh": ("emailFailureRate", "warning"),
    "PayguardPurchaseConflictsHigh": ("purchaseConflictRate", "warning"),
    "PayguardWebhookSignatureRejections": ("webhookSignatureRejections", "warning"),
    "PayguardWebhookProcessingLag": ("webhookLag", "warning"),
    "PayguardQueueStalled": ("queueStalled", "critical"),
    "PayguardReconcileFoundMissedEvents": ("reconcileMissedEvents", "warning"),
    "PayguardFailedOperationsDead": ("failedOperationsDead", "critical"),
    "PayguardFailedOperationsPendingTooLong": ("failedOperationsPendingAge", "warning"),
    "PayguardCleanupJobStale": ("cleanupJobStale", "warning"),
    "PayguardHealthJobStale": ("healthJobStale", "warning"),
    "PayguardReconcileJobStale": ("reconcileJobStale", "warning"),
    "PayguardReservationHoldsStale": ("reservationHoldsStale", "warning"),
    "PayguardAPILatencyHigh": ("apiLatencyP99", "warning"),
    "PayguardRateLimitedSpike": ("rateLimitedSpike", "warning"),
    "PayguardOperatorDown": ("operatorDown", "critical"),
    "PayguardEmailsHeldNoSMTP": ("emailsHeld", "warning"),
}
WITHOUT_THRESHOLD = {"PayguardOperatorDown"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in alert_rules()}


def test_the_rules_are_the_contracts_with_its_severities_and_runbook_links(rules: dict[str, Any]) -> None:
    assert sorted(rules) == sorted(ALERTS)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] == ALERTS[name][1], name
        assert rule["annotations"]["runbook_url"] == f"{RUNBOOKS}/{name}.md"
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule["for"], name


def test_promtool_checks_the_rendered_rules(tmp_path: Path) -> None:
    done = promtool("check", "rules", str(write_rules(tmp_path / "rules.yaml")))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout


def test_promtool_unit_tests_pass_against_the_rendered_rules(tmp_path: Path) -> None:
    write_rules(tmp_path / "rules.yaml")  # what each unit test file names in rule_files
    for test_file in UNIT_TESTS.glob("*_test.yaml"):
        shutil.copy(test_file, tmp_path)
    done = promtool("test", "rules", *sorted(str(p) for p in tmp_path.glob("*_test.yaml")))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    cases: dict[str, dict[str, int]] = {name: {"fires": 0, "silent": 0} for name in ALERTS}
    for test_file in UNIT_TESTS.glob("*_test.yaml"):
        for group in yaml.safe_load(test_file.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                expected = case.get("exp_alerts") or []
                cases[case["alertname"]]["fires" if expected else "silent"] += 1
                for alert in expected:  # the labels and annotations a person sees are pinned
                    assert alert["exp_labels"]["severity"] == ALERTS[case["alertname"]][1]
                    assert alert["exp_annotations"]["runbook_url"] == f"{RUNBOOKS}/{case['alertname']}.md"
    assert {name: c for name, c in cases.items() if not (c["fires"] and c["silent"])} == {}


def test_every_alert_is_driven_to_fire_on_the_live_prometheus() -> None:
    live_tests = (Path(__file__).parent / "test_alerts_live.py").read_text()
    assert [name for name in ALERTS if f'"{name}"' not in live_tests] == []


def test_every_alert_has_its_runbook() -> None:
    # the runbooks are written in docs/runbooks/ by the docs part of this issue
    missing = [name for name in ALERTS if not (ROOT / "docs" / "runbooks" / f"{name}.md").is_file()]
    assert missing == []


def test_every_threshold_for_and_severity_is_a_value(rules: dict[str, Any], tmp_path: Path) -> None:
    changed: dict[str, Any] = {}
    for n, (name, (key, severity)) in enumerate(sorted(ALERTS.items())):
        other = "warning" if severity != "warning" else "critical"  # values.schema.json allows only these
        changed[key] = {"for": f"{n + 2}m", "severity": other}
        if name not in WITHOUT_THRESHOLD:
            changed[key]["threshold"] = round(
                0.9 - n * 0.01, 2
            )  # distinct, unlike any default, a valid share
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"alerts": changed}))
    moved = {r["alert"]: r for r in alert_rules("--values", str(values))}
    for name, (key, _) in ALERTS.items():
        before, after = rules[name], moved[name]
        assert after["for"] == changed[key]["for"], name
        assert after["labels"]["severity"] == changed[key]["severity"], name
        if name in WITHOUT_THRESHOLD:
            assert after["expr"] == before["expr"], name
            continue
        new = changed[key]["threshold"]
        assert re.search(rf"[<>]=? {re.escape(str(new))}\s*$", after["expr"]), (name, after["expr"])
        assert str(new) in after["annotations"]["description"], name
        # nothing but the threshold moved
        assert re.sub(r"[<>]=? [0-9.e+]+\s*$", "", after["expr"]) == re.sub(
            r"[<>]=? [0-9.e+]+\s*$", "", before["expr"]
        )
    done = promtool("check", "rules", str(write_rules(tmp_path / "rules.yaml", "--values", str(values))))
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_disabled_alert_is_not_rendered_and_common_labels_are_added() -> None:
    rules = alert_rules(
        "--set", "alerts.queueStalled.enabled=false",
        "--set", "alerts.labels.team=payments",
        "--set", "alerts.labels.severity=ignored",
    )  # fmt: skip
    assert sorted(r["alert"] for r in rules) == sorted(set(ALERTS) - {"PayguardQueueStalled"})
    for rule in rules:
        assert rule["labels"]["team"] == "payments"
        assert rule["labels"]["severity"] == ALERTS[rule["alert"]][1]  # an alert's own severity wins


def test_the_operator_alert_goes_with_the_operator() -> None:
    rules = alert_rules("--set", "operator.enabled=false")
    assert "PayguardOperatorDown" not in {r["alert"] for r in rules}


@pytest.mark.parametrize(
    ("args", "rendered"),
    [
        ([], False),  # auto, and no Prometheus Operator in the cluster
        (["--api-versions", "monitoring.coreos.com/v1"], True),
        (["--set", "monitoring.prometheusOperator=always"], True),
        (
            ["--set", "monitoring.prometheusOperator=never", "--api-versions", "monitoring.coreos.com/v1"],
            False,
        ),
    ],
)
def test_the_prometheus_rule_is_rendered_where_the_prometheus_operator_is(
    args: list[str], rendered: bool
) -> None:
    rules = of_kind(helm_template(*args), "PrometheusRule")
    assert bool(rules) == rendered
    if rendered:
        (rule,) = rules
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == "payguard"


def test_prometheus_rule_labels_come_from_the_values() -> None:
    (rule,) = of_kind(
        helm_template(*MONITORED, "--set", "monitoring.prometheusRule.labels.release=kube-prometheus-stack"),
        "PrometheusRule",
    )
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_every_selector_is_held_to_the_release_namespace() -> None:
    for rule in alert_rules(namespace="shop"):
        selectors = re.findall(r"\b(?:payguard_\w+|up)\{([^}]*)\}", rule["expr"])
        assert selectors, rule["alert"]
        assert all('namespace="shop"' in s for s in selectors), (rule["alert"], rule["expr"])


# --- the AlertmanagerConfig --------------------------------------------------------------------------

SLACK = ["--set", "monitoring.alertmanagerConfig.enabled=true", "--set", "monitoring.alertmanagerConfig.slack.existingSecret=payguard-slack"]  # fmt: skip


def test_no_alertmanager_config_unless_asked() -> None:
    assert of_kind(helm_template(*MONITORED), "AlertmanagerConfig") == []


def test_an_alertmanager_config_without_its_secret_is_refused_with_the_value_to_set() -> None:
    with pytest.raises(HelmError, match=r"monitoring\.alertmanagerConfig\.slack\.existingSecret"):
        helm_template("--set", "monitoring.alertmanagerConfig.enabled=true")


def test_the_alertmanager_config_routes_by_severity_to_slack_from_a_secret() -> None:
    (amc,) = of_kind(
        helm_template(*SLACK, "--set", "monitoring.alertmanagerConfig.slack.key=url", "--set", "monitoring.alertmanagerConfig.labels.alertmanagerConfig=payguard"),
        "AlertmanagerConfig",
    )  # fmt: skip
    assert amc["apiVersion"] == "monitoring.coreos.com/v1alpha1"
    assert amc["metadata"]["labels"]["alertmanagerConfig"] == "payguard"
    spec = amc["spec"]
    by_receiver = {r["name"]: r["slackConfigs"] for r in spec["receivers"]}
    routes = {
        tuple((m["name"], m["matchType"], m["value"]) for m in r["matchers"]): r["receiver"]
        for r in spec["route"]["routes"]
    }
    assert routes == {
        (("severity", "=~", "critical|error"),): "slack-critical",
        (("severity", "=", "warning"),): "slack-warning",
    }
    channels = {name: configs[0]["channel"] for name, configs in by_receiver.items()}
    assert channels == {"slack-critical": "#payguard-critical", "slack-warning": "#payguard-warnings"}
    for (config,) in by_receiver.values():
        assert config["apiURL"] == {"name": "payguard-slack", "key": "url"}  # never the URL itself
        assert config["sendResolved"] is True
        for field in (".Annotations.summary", ".Annotations.description", ".Annotations.runbook_url"):
            assert field in config["text"]


def test_amtool_accepts_the_routing_as_alertmanager_receives_it(tmp_path: Path) -> None:
    (amc,) = of_kind(helm_template(*SLACK), "AlertmanagerConfig")
    config = tmp_path / "alertmanager.yml"
    config.write_text(
        yaml.safe_dump(alertmanager_config(amc, "http://127.0.0.1:9/slack", timings=FAST_ROUTING))
    )
    amtool = require_binary("amtool")
    done = subprocess.run(
        [amtool, "check-config", str(config)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    routing = {  # labels -> the receiver Alertmanager picks
        "alertname=PayguardQueueStalled severity=critical namespace=payguard": "slack-critical",
        "alertname=PayguardDatabaseTimeouts severity=error namespace=payguard": "slack-critical",
        "alertname=PayguardEmailsHeldNoSMTP severity=warning namespace=payguard": "slack-warning",
        "alertname=PayguardQueueStalled severity=critical namespace=elsewhere": "null",  # another release's
        "alertname=KubePodCrashLooping severity=critical namespace=payguard": "null",  # not payguard's
    }
    for labels, receiver in routing.items():
        routed = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={config}", *labels.split()],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert routed.stdout.strip() == receiver, (labels, routed.stdout, routed.stderr)
