"""values.schema.json refuses each kind of mistake in the values: helm stops before rendering anything
and names the field. The chart's own checks (`required`/`fail`) do the same for what a schema cannot
say. And values.yaml keeps the alert contract the rules, runbooks and dashboards rely on."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.fixtures.chart import CHART, helm, template_args

SCHEMA_REFUSED = "values don't meet the specifications of the schema"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "api.replicaCount=two"], "/api/replicaCount"),
        (["--set-string", "operator.enabled=yes"], "/operator/enabled"),
        (["--set", "ingress.hosts=pay.example.com"], "/ingress/hosts"),
        (["--set", "replicas=3"], "'replicas'"),
        (["--set", "alerts.dbTimeouts.threshhold=3"], "'threshhold'"),
        (["--set", "alerts.operatorDown.threshold=1"], "'threshold'"),
        (["--set", "alerts.dbTimeouts.severity=page"], "/alerts/dbTimeouts/severity"),
        (["--set", "alerts.queueStalled.threshold=-1"], "/alerts/queueStalled/threshold"),
        (["--set", "alerts.http5xxRate.threshold=5"], "/alerts/http5xxRate/threshold"),
        (["--set-string", "alerts.webhookLag.threshold=60"], "/alerts/webhookLag/threshold"),
        (["--set", "alerts.webhookLag.for=10min"], "/alerts/webhookLag/for"),
        (["--set", "monitoring.serviceMonitor.interval=30"], "/monitoring/serviceMonitor/interval"),
        (["--set", "monitoring.prometheusOperator=yes"], "/monitoring/prometheusOperator"),
        (["--set", "jobs.cleanup.schedule=every five minutes"], "/jobs/cleanup/schedule"),
        (["--set", "podSecurityContext.runAsUser=0"], "/podSecurityContext/runAsUser"),
        (["--set", "worker.metricsPort=70000"], "/worker/metricsPort"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "database.existingSecret=Payguard_DB"], "/database/existingSecret"),
        (["--set", "config.PAYGUARD_RUN_WORKER=true"], "'PAYGUARD_RUN_WORKER'"),
        (["--set", "config.log_level=DEBUG"], "'log_level'"),
        (["--set", "api.resources.requests.cpu=lots"], "/api/resources/requests/cpu"),
        (["--set", "api.resources.limits=null"], "'limits'"),
    ],
    ids=[
        "wrong-type-integer",
        "wrong-type-boolean",
        "wrong-type-list",
        "unknown-top-level-key",
        "unknown-alert-key",
        "threshold-on-an-alert-without-one",
        "bad-severity",
        "negative-threshold",
        "share-above-one",
        "threshold-as-string",
        "bad-duration",
        "interval-without-unit",
        "bad-prometheus-operator-mode",
        "bad-cron-schedule",
        "root-user",
        "port-out-of-range",
        "bad-pull-policy",
        "secret-name-not-dns",
        "chart-owned-variable-in-config",
        "config-name-not-a-setting",
        "bad-quantity",
        "no-limits",
    ],
)
def test_the_schema_refuses_a_mistake_and_names_it(args: list[str], named: str) -> None:
    done = helm(*template_args(), *args, check=False)
    assert done.returncode != 0 and done.stdout == ""
    assert SCHEMA_REFUSED in done.stderr, done.stderr
    assert named in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "database.existingSecret="], "database.existingSecret"),
        (["--set", "auth.existingSecret="], "auth.jwksUrl"),
    ],
    ids=["no-database", "no-token-check"],
)
def test_the_chart_refuses_a_setup_that_cannot_run(args: list[str], named: str) -> None:
    done = helm(*template_args(), *args, check=False)
    assert done.returncode != 0 and named in done.stderr, done.stderr


def test_a_jwks_url_replaces_the_token_secret() -> None:
    done = helm(
        *template_args(),
        "--set",
        "auth.existingSecret=",
        "--set",
        "auth.jwksUrl=https://auth.example.com/jwks",
    )
    assert "PAYGUARD_JWKS_URL" in done.stdout and "PAYGUARD_JWT_SECRET" not in done.stdout


# The contract the alert rules, their runbooks and the dashboards share: values key -> (alert,
# default threshold or None, severity).
ALERTS = {
    "purchaseFailureRate": ("PayguardPurchaseFailureRateHigh", 0.05, "critical"),
    "webhookFailureRate": ("PayguardWebhookFailureRateHigh", 0.05, "critical"),
    "http5xxRate": ("PayguardHTTP5xxRateHigh", 0.05, "error"),
    "dbTimeouts": ("PayguardDatabaseTimeouts", 5, "error"),
    "emailFailureRate": ("PayguardEmailFailureRateHigh", 0.10, "warning"),
    "purchaseConflictRate": ("PayguardPurchaseConflictsHigh", 0.01, "warning"),
    "webhookSignatureRejections": ("PayguardWebhookSignatureRejections", 10, "warning"),
    "webhookLag": ("PayguardWebhookProcessingLag", 60, "warning"),
    "queueStalled": ("PayguardQueueStalled", 300, "critical"),
    "reconcileMissedEvents": ("PayguardReconcileFoundMissedEvents", 0, "warning"),
    "failedOperationsDead": ("PayguardFailedOperationsDead", 0, "critical"),
    "failedOperationsPendingAge": ("PayguardFailedOperationsPendingTooLong", 3600, "warning"),
    "cleanupJobStale": ("PayguardCleanupJobStale", 900, "warning"),
    "healthJobStale": ("PayguardHealthJobStale", 7200, "warning"),
    "reconcileJobStale": ("PayguardReconcileJobStale", 1800, "warning"),
    "reservationHoldsStale": ("PayguardReservationHoldsStale", 1200, "warning"),
    "apiLatencyP99": ("PayguardAPILatencyHigh", 1.0, "warning"),
    "rateLimitedSpike": ("PayguardRateLimitedSpike", 1, "warning"),
    "operatorDown": ("PayguardOperatorDown", None, "critical"),
    "emailsHeld": ("PayguardEmailsHeldNoSMTP", 0, "warning"),
}


def test_values_yaml_holds_the_alert_contract() -> None:
    alerts = yaml.safe_load((CHART / "values.yaml").read_text())["alerts"]
    assert alerts.pop("runbookBaseUrl") == "https://github.com/payguard/payguard/blob/main/docs/runbooks"
    assert alerts.pop("labels") == {}
    assert sorted(alerts) == sorted(ALERTS)
    for key, (_alert, threshold, severity) in ALERTS.items():
        entry = alerts[key]
        assert (entry["enabled"], entry["severity"], entry.get("threshold")) == (True, severity, threshold), (
            key
        )
        assert isinstance(entry["for"], str), key


def test_each_alert_is_named_beside_its_values_key() -> None:
    """values.yaml says which alert each key sets: the comment above it names the alert."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for key, (alert, _threshold, _severity) in ALERTS.items():
        (at,) = [n for n, line in enumerate(lines) if line.startswith(f"  {key}: ")]
        assert alert in lines[at - 1], key


def schema_node(schema: dict[str, Any], node: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The schema of `key` inside an object schema `node` ($ref resolved), None if it has none."""
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rpartition("/")[2]]
    if key in node.get("properties", {}):
        found: dict[str, Any] = node["properties"][key]
    elif isinstance(node.get("additionalProperties"), dict):
        found = node["additionalProperties"]
    else:
        return None
    while "$ref" in found:
        found = schema["definitions"][found["$ref"].rpartition("/")[2]]
    return found


def test_the_schema_types_every_value_in_values_yaml() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    untyped = []

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        for key, value in values.items():
            sub = schema_node(schema, node, key)
            if sub is None or not ({"type", "enum", "oneOf", "anyOf"} & set(sub)):
                untyped.append(f"{path}{key}")
            elif isinstance(value, dict):
                walk(value, sub, f"{path}{key}.")

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "")
    assert untyped == []
    assert schema["additionalProperties"] is False
