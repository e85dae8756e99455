"""Every object the chart renders is valid for the API that will receive it: built-in kinds against
Kubernetes' own schemas (kubernetes-validate, strict) for the oldest and newest Kubernetes the chart
supports, custom resources against the openAPIV3Schema of the CRD that defines them (vendored from
upstream under tests/chart/crds/, the chart's own under charts/payguard/crds/)."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import kubernetes_validate
import pytest

from tests.fixtures.chart import CHART, MONITORING_API, VALUES_MAX, VENDORED_CRDS, Render, render
from tests.fixtures.crd_schema import crd_validator, load_crds, problems

Body = dict[str, Any]
KUBE_VERSIONS = ["1.29.0", "1.35.0"]  # Chart.yaml's kubeVersion floor, and the newest kubectl here
VALUES = {"defaults": (), "max": (VALUES_MAX,)}


def crds_by_kind() -> dict[tuple[str, str], Body]:
    """(group, kind) -> CRD, for every CRD the chart ships or the tests vendored."""
    files = sorted(VENDORED_CRDS.glob("*.yaml")) + sorted((CHART / "crds").glob("*.yaml"))
    return {(c["spec"]["group"], c["spec"]["names"]["kind"]): c for f in files for c in load_crds(f)}


CRDS = crds_by_kind()


def group_of(obj: Body) -> str:
    return obj["apiVersion"].rpartition("/")[0]


def is_custom(obj: Body) -> bool:
    return (group_of(obj), obj["kind"]) in CRDS


def name(obj: Body) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def custom_problems(obj: Body) -> list[str]:
    crd = CRDS[(group_of(obj), obj["kind"])]
    return problems(crd_validator(crd, obj["apiVersion"].rpartition("/")[2]), obj)


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUES, ids=str)
def test_every_built_in_object_is_valid_for_kubernetes(values: str, kube: str) -> None:
    rendered = render(VALUES[values], kube_version=kube, api_versions=(MONITORING_API,))
    built_in = [obj for obj in rendered.objects if not is_custom(obj)]
    assert {"Deployment", "CronJob", "Job", "Service", "Role", "CustomResourceDefinition"} <= {
        o["kind"] for o in built_in
    }
    errors = []
    for obj in built_in:
        try:
            kubernetes_validate.validate(obj, kube, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{name(obj)}: {'.'.join(map(str, error.path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:  # neither built in nor a known CRD
            errors.append(f"{name(obj)}: {error.message}")
    assert errors == []


@pytest.mark.parametrize("values", VALUES, ids=str)
def test_every_custom_resource_is_valid_for_its_crd(values: str) -> None:
    rendered = render(VALUES[values], api_versions=(MONITORING_API,))
    custom = [obj for obj in rendered.objects if is_custom(obj)]
    assert custom
    assert {name(obj): custom_problems(obj) for obj in custom} == {name(obj): [] for obj in custom}


def test_the_maximal_render_has_every_kind_of_custom_resource(maximal: Render) -> None:
    """So the validation above is not vacuous: each custom kind the chart can render is rendered."""
    assert {
        "ServiceMonitor",
        "PrometheusRule",
        "AlertmanagerConfig",
        "Cluster",
        "KopfPeering",
    } <= maximal.kinds()


def test_the_built_in_validation_refuses_a_mistake(defaults: Render) -> None:
    deployment = copy.deepcopy(defaults.of_kind("Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.35.0", strict=True)


def changed(obj: Body, path: tuple[str | int, ...], value: object) -> Body:
    doc = copy.deepcopy(obj)
    parent: Any = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("kind", "path", "value", "where"),
    [
        ("ServiceMonitor", ("spec", "endpoints", 0, "intervall"), "30s", "spec.endpoints.0"),
        ("ServiceMonitor", ("spec", "endpoints", 0, "interval"), "30 seconds", "spec.endpoints.0.interval"),
        ("Cluster", ("spec", "instances"), "three", "spec.instances"),
        ("Cluster", ("spec", "storage", "sizee"), "1Gi", "spec.storage"),
        ("KopfPeering", ("spec",), {}, "<root>"),
    ],
    ids=[
        "servicemonitor-unknown-field",
        "servicemonitor-bad-interval",
        "cluster-instances-string",
        "cluster-unknown-field",
        "kopfpeering-spec",
    ],
)
def test_the_crd_validation_refuses_a_mistake(
    maximal: Render, kind: str, path: tuple[str | int, ...], value: object, where: str
) -> None:
    (obj,) = maximal.of_kind(kind)
    found = custom_problems(changed(obj, path, value))
    assert len(found) == 1 and found[0].startswith(f"{where}: "), found


RULE = {"alert": "PayguardExample", "expr": "vector(1) > 0", "for": "5m", "labels": {"severity": "warning"}}


@pytest.mark.parametrize(
    ("rule", "valid"),
    [
        (RULE, True),
        ({**RULE, "for": "five minutes"}, False),
        ({key: v for key, v in RULE.items() if key != "expr"}, False),
        ({**RULE, "severity": "warning"}, False),
    ],
    ids=["valid", "bad-for", "no-expr", "unknown-field"],
)
def test_the_vendored_prometheusrule_crd_takes_rules_and_refuses_mistakes(rule: Body, valid: bool) -> None:
    """The alerting templates render PrometheusRules; the vendored schema they are checked against works."""
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "payguard"},
        "spec": {"groups": [{"name": "payguard", "rules": [rule]}]},
    }
    assert (custom_problems(doc) == []) is valid, custom_problems(doc)


# What the operator writes for each kind of failed operation (see tests/operator/test_crd.py for the
# field-by-field refusals of the same schema in k8s/).
FAILED_OPERATIONS = [
    {"kind": "email", "reference": "ob_41", "rowId": 41, "maxAttempts": 4},
    {"kind": "webhook", "reference": "evt_1Qx", "rowId": 42, "maxAttempts": 6, "suspend": True},
    {"kind": "refund_shortfall", "reference": "re_9", "rowId": 43, "maxAttempts": 3},
]
STATUS = {
    "phase": "Dead",
    "attempts": 3,
    "maxAttempts": 3,
    "nextAttemptAt": None,
    "lastError": "card_declined",
    "observedGeneration": 1,
    "conditions": [
        {
            "type": "Succeeded",
            "status": "False",
            "reason": "RetriesExhausted",
            "message": "3 of 3 attempts failed",
            "lastTransitionTime": "2026-11-26T15:00:00Z",
        }
    ],
}


def failed_operation(spec: Body, status: Body | None = STATUS) -> Body:
    doc: Body = {
        "apiVersion": "payguard.dev/v1",
        "kind": "FailedOperation",
        "metadata": {"name": f"{spec['kind'].replace('_', '-')}-{spec['rowId']}", "namespace": "payments"},
        "spec": spec,
    }
    if status is not None:
        doc["status"] = status
    return doc


@pytest.mark.parametrize("spec", FAILED_OPERATIONS, ids=lambda s: s["kind"])
def test_failed_operation_samples_are_valid_for_the_charts_crd(spec: Body) -> None:
    assert custom_problems(failed_operation(spec)) == []
    assert custom_problems(failed_operation(spec, status=None)) == []


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        (failed_operation({**FAILED_OPERATIONS[0], "kind": "sms"}), "spec.kind"),
        (failed_operation({**FAILED_OPERATIONS[0], "rowId": 0}), "spec.rowId"),
        (failed_operation(FAILED_OPERATIONS[0], {**STATUS, "phase": "Lost"}), "status.phase"),
        (failed_operation(FAILED_OPERATIONS[0], {**STATUS, "nextAttemptAt": "soon"}), "status.nextAttemptAt"),
    ],
    ids=["unknown-kind", "row-zero", "unknown-phase", "next-attempt-not-a-time"],
)
def test_the_charts_failed_operation_crd_refuses_a_wrong_field(doc: Body, where: str) -> None:
    found = custom_problems(doc)
    assert len(found) == 1 and found[0].startswith(f"{where}: "), found


def test_the_vendored_crds_are_the_upstream_files_the_readme_names() -> None:
    """Each vendored CRD has its source, version, licence and checksum in the README, and is unchanged."""
    rows = {
        line.split("|")[1].strip(" `"): line
        for line in (VENDORED_CRDS / "README.md").read_text().splitlines()
        if line.startswith("| `")
    }
    files = sorted(VENDORED_CRDS.glob("*.yaml"))
    assert sorted(rows) == [path.name for path in files]
    for path in files:
        assert hashlib.sha256(path.read_bytes()).hexdigest() in rows[path.name], path.name
        assert "Apache-2.0" in rows[path.name] and "https://github.com/" in rows[path.name]
        assert len(load_crds(path)) == 1, path.name
