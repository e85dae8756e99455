"""What the rendered chart runs and how: helm lint, the commands and settings of each workload, the
security of every pod, the CronJobs, secrets only by reference, monitoring only where it can exist,
the migrations hook, and the copies of k8s/ that must stay the same files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.chart import CHART, MONITORING_API, ROOT, VALUES_MAX, Render, helm, render

Body = dict[str, Any]
SECRET_ENV = {
    "DATABASE_URL",
    "PAYGUARD_JWT_SECRET",
    "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRETS",
    "SMTP_PASSWORD",
}
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"}
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - in a pod, the probes and Prometheus come from outside it
JOBS = {"cleanup": "*/5 * * * *", "health": "0 * * * *", "reconcile": "*/10 * * * *"}


def containers(pod: Body) -> list[Body]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def env_of(container: Body) -> dict[str, Body]:
    names = [entry["name"] for entry in container.get("env", [])]
    assert len(names) == len(set(names)), f"{container['name']}: a variable set twice: {names}"
    return {entry["name"]: entry for entry in container.get("env", [])}


def deployment(rendered: Render, component: str) -> Body:
    return rendered.one("Deployment", f"payguard-{component}")


def only_container(workload: Body) -> Body:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def selects(selector: Body, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and In/NotIn/Exists expressions) against a set of labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not matched:
            return False
    return True


@pytest.mark.parametrize("values", [(), (VALUES_MAX,)], ids=["defaults", "max"])
def test_helm_lint_strict_passes(values: tuple[Path, ...]) -> None:
    args = ["lint", "--strict", str(CHART)]
    for path in values:
        args += ["--values", str(path)]
    done = helm(*args)
    assert "0 chart(s) failed" in done.stdout


def test_the_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["apiVersion"], chart["name"], chart["version"], chart["appVersion"]) == (
        "v2",
        "payguard",
        "0.1.0",
        "0.1.0",
    )
    assert chart["kubeVersion"] == ">=1.29.0-0"


def test_the_chart_refuses_a_kubernetes_older_than_it_supports() -> None:
    done = helm("template", "payguard", str(CHART), "--kube-version", "1.28.9", check=False)
    assert done.returncode != 0 and "kubeVersion" in done.stderr, done.stderr


@pytest.mark.parametrize("maximal_values", [False, True], ids=["defaults", "max"])
def test_every_pod_runs_non_root_read_only_with_resources(
    defaults: Render, maximal: Render, maximal_values: bool
) -> None:
    rendered = maximal if maximal_values else defaults
    specs = rendered.pod_specs()
    assert len(specs) == 7  # api, worker, operator, three CronJobs, migrations
    for where, pod in specs:
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] > 0, where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        tmp = {v["name"]: v for v in pod["volumes"]}["tmp"]
        assert "emptyDir" in tmp, where
        for container in containers(pod):
            at = f"{where} {container['name']}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, at
            assert context["allowPrivilegeEscalation"] is False, at
            assert context["runAsNonRoot"] is True, at
            assert context["capabilities"] == {"drop": ["ALL"]}, at
            assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"], at
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), at
            assert "memory" in resources["limits"], at


def test_serve_runs_without_its_in_process_worker_and_jobs(defaults: Render) -> None:
    api = only_container(deployment(defaults, "api"))
    assert api["args"][:3] == ["serve", "--host", ALL_INTERFACES]
    assert api["args"][3:] == ["--port", "8000"]
    env = env_of(api)
    assert env["PAYGUARD_RUN_WORKER"]["value"] == "false"
    assert env["PAYGUARD_RUN_JOBS"]["value"] == "false"
    assert env["PAYGUARD_RETRY_DRIVER"]["value"] == "kubernetes"  # the operator is on by default
    assert api["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in api["ports"]


def test_the_api_spreads_over_zones_and_nodes(defaults: Render) -> None:
    api = deployment(defaults, "api")
    pod = api["spec"]["template"]
    constraints = pod["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in constraints] == [
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    ]
    assert all(selects(c["labelSelector"], pod["metadata"]["labels"]) for c in constraints)
    assert api["spec"]["replicas"] == 2
    assert not defaults.of_kind("HorizontalPodAutoscaler") and not defaults.of_kind("PodDisruptionBudget")


def test_the_autoscaler_and_disruption_budget_take_the_api(maximal: Render) -> None:
    api = deployment(maximal, "api")
    assert "replicas" not in api["spec"]  # the HorizontalPodAutoscaler owns the count
    (hpa,) = maximal.of_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "payguard-api",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    (pdb,) = maximal.of_kind("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], api["spec"]["template"]["metadata"]["labels"])
    assert not selects(
        pdb["spec"]["selector"], deployment(maximal, "worker")["spec"]["template"]["metadata"]["labels"]
    )


def test_the_worker_serves_its_metrics_on_a_scraped_port(defaults: Render) -> None:
    worker = only_container(deployment(defaults, "worker"))
    assert worker["args"] == ["worker", "--metrics-host", ALL_INTERFACES, "--metrics-port", "9100"]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in worker["ports"]
    assert worker["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert "PAYGUARD_RUN_WORKER" not in env_of(worker)
    service = defaults.one("Service", "payguard-worker")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_each_service_selects_its_own_pods(maximal: Render) -> None:
    for component, port in (("api", "http"), ("worker", "metrics"), ("operator", "metrics")):
        service = maximal.one("Service", f"payguard-{component}")
        for other in ("api", "worker", "operator"):
            labels = deployment(maximal, other)["spec"]["template"]["metadata"]["labels"]
            assert selects({"matchLabels": service["spec"]["selector"]}, labels) is (other == component)
        assert [p["name"] for p in service["spec"]["ports"]] == [port]


def test_the_service_monitor_scrapes_the_api_the_worker_and_the_operator(maximal: Render) -> None:
    (monitor,) = maximal.of_kind("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    scraped = [
        s for s in maximal.of_kind("Service") if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    # the job label is the Service's name: PayguardOperatorDown watches up{job="<fullname>-operator"}
    assert sorted(s["metadata"]["name"] for s in scraped) == [
        "payguard-api",
        "payguard-operator",
        "payguard-worker",
    ]
    endpoints = {e["port"]: e for e in monitor["spec"]["endpoints"]}
    assert sorted(endpoints) == ["http", "metrics"]
    assert all(e["path"] == "/metrics" and e["interval"] == "15s" for e in endpoints.values())
    ports = {p["name"] for s in scraped for p in s["spec"]["ports"]}
    assert set(endpoints) <= ports


def test_the_operator_runs_once_with_its_own_least_privilege_account(defaults: Render) -> None:
    operator = deployment(defaults, "operator")
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}  # never two at once during a rollout
    pod = operator["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "payguard-operator" and pod["automountServiceAccountToken"] is True
    container = only_container(operator)
    assert container["args"] == ["operator"]
    env = env_of(container)
    assert env["PAYGUARD_KUBE_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["PAYGUARD_RETRY_DRIVER"]["value"] == "kubernetes"
    assert env["PAYGUARD_OPERATOR_LIVENESS"]["value"] == "http://0.0.0.0:8080/healthz"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert (
        env["PAYGUARD_OPERATOR_METRICS_HOST"]["value"],
        env["PAYGUARD_OPERATOR_METRICS_PORT"]["value"],
    ) == (
        ALL_INTERFACES,
        "9102",
    )
    assert container["ports"] == [
        {"name": "healthz", "containerPort": 8080, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9102, "protocol": "TCP"},
    ]

    k8s_rbac = [doc for doc in yaml.safe_load_all((ROOT / "k8s" / "operator-rbac.yaml").read_text()) if doc]
    (k8s_role,) = [doc for doc in k8s_rbac if doc["kind"] == "Role"]
    role = defaults.one("Role", "payguard-operator")
    assert role["rules"] == k8s_role["rules"]
    binding = defaults.one("RoleBinding", "payguard-operator")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "payguard-operator",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "payguard-operator", "namespace": "payments"}
    ]
    defaults.one("ServiceAccount", "payguard-operator")

    # the peering object it is told to use is the one rendered and the one its Role may touch
    (peering,) = defaults.of_kind("KopfPeering")
    assert peering["metadata"]["name"] == env["PAYGUARD_OPERATOR_PEERING"]["value"] == "payguard"
    assert any(peering["metadata"]["name"] in rule.get("resourceNames", []) for rule in role["rules"])


def test_the_app_pods_carry_no_kubernetes_token(defaults: Render) -> None:
    for where, pod in defaults.pod_specs():
        if where != "Deployment/payguard-operator":
            assert pod["automountServiceAccountToken"] is False, where
    assert defaults.one("ServiceAccount", "payguard")["automountServiceAccountToken"] is False


def test_without_the_operator_the_workers_retry() -> None:
    rendered = render(sets=("operator.enabled=false",))
    assert not {"Role", "RoleBinding", "KopfPeering"} & rendered.kinds()
    assert [d["metadata"]["name"] for d in rendered.of_kind("Deployment")] == [
        "payguard-api",
        "payguard-worker",
    ]
    for where, pod in rendered.pod_specs():
        for container in containers(pod):
            assert env_of(container)["PAYGUARD_RETRY_DRIVER"]["value"] == "local", where


def test_the_cronjobs_run_each_job_on_its_schedule_one_at_a_time(defaults: Render) -> None:
    cronjobs = {c["metadata"]["name"].removeprefix("payguard-"): c for c in defaults.of_kind("CronJob")}
    assert {name: c["spec"]["schedule"] for name, c in cronjobs.items()} == JOBS
    for name, cronjob in cronjobs.items():
        spec = cronjob["spec"]
        assert spec["concurrencyPolicy"] == "Forbid", name
        assert spec["startingDeadlineSeconds"] == 120, name
        assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (3, 3), name
        job = spec["jobTemplate"]["spec"]
        assert job["backoffLimit"] == 1, name
        assert 0 < job["activeDeadlineSeconds"], name
        pod = job["template"]["spec"]
        assert pod["restartPolicy"] == "Never", name
        (container,) = pod["containers"]
        assert container["args"] == ["jobs", name]
    # a run never outlasts the interval to the next one
    assert cronjobs["cleanup"]["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 300
    assert cronjobs["reconcile"]["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 600


def test_schedules_are_values_and_reconcile_needs_stripe() -> None:
    rendered = render(sets=("jobs.health.schedule=30 2 * * *", "stripe.existingSecret="))
    schedules = {c["metadata"]["name"]: c["spec"]["schedule"] for c in rendered.of_kind("CronJob")}
    assert schedules == {"payguard-cleanup": "*/5 * * * *", "payguard-health": "30 2 * * *"}


def test_no_secret_is_rendered_by_default_and_secrets_are_referenced(defaults: Render) -> None:
    assert defaults.of_kind("Secret") == []
    expected = {
        "DATABASE_URL": {"name": "payguard-database", "key": "DATABASE_URL"},
        "PAYGUARD_JWT_SECRET": {"name": "payguard-jwt", "key": "PAYGUARD_JWT_SECRET"},
        "STRIPE_SECRET_KEY": {"name": "payguard-stripe", "key": "STRIPE_SECRET_KEY"},
        "STRIPE_WEBHOOK_SECRETS": {"name": "payguard-stripe", "key": "STRIPE_WEBHOOK_SECRETS"},
    }
    for where, pod in defaults.pod_specs():
        for container in containers(pod):
            env = env_of(container)
            refs = {name: env[name]["valueFrom"]["secretKeyRef"] for name in SECRET_ENV if name in env}
            assert refs == expected, where
            assert all("value" not in env[name] for name in refs), where


def test_secrets_from_values_only_when_asked(maximal: Render) -> None:
    (secret,) = maximal.of_kind("Secret")
    assert secret["metadata"]["name"] == "payguard-secrets"
    # a hook before the migrations hook, which reads it on the first install
    assert secret["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0
    assert sorted(secret["stringData"]) == [
        "PAYGUARD_JWT_SECRET",
        "STRIPE_SECRET_KEY",
        "STRIPE_WEBHOOK_SECRETS",
    ]
    expected = {
        "DATABASE_URL": {"name": "payguard-db-app", "key": "uri"},  # CloudNativePG's Secret
        "PAYGUARD_JWT_SECRET": {"name": "payguard-secrets", "key": "PAYGUARD_JWT_SECRET"},
        "STRIPE_SECRET_KEY": {"name": "payguard-secrets", "key": "STRIPE_SECRET_KEY"},
        "STRIPE_WEBHOOK_SECRETS": {"name": "payguard-secrets", "key": "STRIPE_WEBHOOK_SECRETS"},
        "SMTP_PASSWORD": {"name": "payguard-smtp", "key": "SMTP_PASSWORD"},
    }
    for where, pod in maximal.pod_specs():
        for container in containers(pod):
            env = env_of(container)
            assert {name: env[name]["valueFrom"]["secretKeyRef"] for name in SECRET_ENV} == expected, where
            plain = {name: entry.get("value") for name, entry in env.items() if "value" in entry}
            assert plain["SMTP_HOST"] == "smtp.example.com" and plain["PAYGUARD_WORKER_CONCURRENCY"] == "20"
            assert plain["SMTP_STARTTLS"] == "false" and plain["PAYGUARD_SMTP_TIMEOUT_S"] == "7.5"
            assert not set(plain) & SECRET_ENV, where


def test_cloudnativepg_cluster_holds_the_database(maximal: Render) -> None:
    (cluster,) = maximal.of_kind("Cluster")
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    assert cluster["metadata"]["name"] == "payguard-db"
    assert cluster["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep"
    }  # uninstall keeps the data
    spec = cluster["spec"]
    assert spec["instances"] == 3
    assert spec["storage"] == {"size": "20Gi", "storageClass": "fast-ssd"}
    assert spec["bootstrap"]["initdb"] == {"database": "payguard", "owner": "payguard"}
    assert "Cluster" not in render().kinds()  # default: an external database


@pytest.mark.parametrize(
    ("cloudnative", "hook"),
    [(False, "pre-install,pre-upgrade"), (True, "post-install,pre-upgrade")],
    ids=["external-database", "cloudnativepg"],
)
def test_migrations_run_as_a_hook_before_the_new_pods(cloudnative: bool, hook: str) -> None:
    rendered = render(sets=(f"postgresql.cloudnative.enabled={str(cloudnative).lower()}",))
    (job,) = rendered.of_kind("Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == hook
    assert annotations["helm.sh/hook-weight"] == "0"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    pod = job["spec"]["template"]["spec"]
    assert (
        pod["restartPolicy"] == "Never" and "serviceAccountName" not in pod
    )  # it runs before the account exists
    (container,) = pod["containers"]
    assert container["args"] == ["migrate"]


@pytest.mark.parametrize(
    ("mode", "api_served", "rendered"),
    [
        ("auto", False, False),
        ("auto", True, True),
        ("always", False, True),
        ("never", True, False),
    ],
    ids=["auto-without-the-api", "auto-with-the-api", "always", "never"],
)
def test_monitoring_objects_follow_the_prometheus_operator_mode(
    mode: str, api_served: bool, rendered: bool
) -> None:
    chart = render(
        sets=(f"monitoring.prometheusOperator={mode}",),
        api_versions=(MONITORING_API,) if api_served else (),
    )
    kinds = chart.kinds() & MONITORING_KINDS
    assert kinds == ({"ServiceMonitor", "PrometheusRule"} if rendered else set())


def test_ingress_routes_to_the_api_service(maximal: Render) -> None:
    (ingress,) = maximal.of_kind("Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "payguard-tls", "hosts": ["pay.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    backends = [path["backend"]["service"] for path in rule["http"]["paths"]]
    assert backends == [{"name": "payguard-api", "port": {"name": "http"}}] * 2


def test_network_policies_cover_every_pod(maximal: Render) -> None:
    policies = maximal.of_kind("NetworkPolicy")
    for where, _pod in maximal.pod_specs():
        workload = next(o for o in maximal.objects if f"{o['kind']}/{o['metadata']['name']}" == where)
        template = workload["spec"].get("template") or workload["spec"]["jobTemplate"]["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert [p for p in policies if selects(p["spec"]["podSelector"], labels)], where
    ingress_nginx = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    http, metrics = [{"port": "http", "protocol": "TCP"}], [{"port": "metrics", "protocol": "TCP"}]
    # the API's port takes the ingress controller, and Prometheus for /metrics; the others' only Prometheus
    assert maximal.one("NetworkPolicy", "payguard-api")["spec"]["ingress"] == [
        {"ports": http, "from": [ingress_nginx]},
        {"ports": http, "from": [prometheus]},
    ]
    scraped = maximal.one("NetworkPolicy", "payguard-metrics")
    assert scraped["spec"]["ingress"] == [{"ports": metrics, "from": [prometheus]}]
    for component in ("worker", "operator", "api"):
        labels = deployment(maximal, component)["spec"]["template"]["metadata"]["labels"]
        assert selects(scraped["spec"]["podSelector"], labels) is (component != "api")
    quiet = maximal.one("NetworkPolicy", "payguard-no-ingress")
    assert "ingress" not in quiet["spec"] and quiet["spec"]["policyTypes"] == ["Ingress"]


def test_every_object_carries_the_charts_labels(maximal: Render) -> None:
    for obj in maximal.objects:
        if obj["kind"] == "CustomResourceDefinition":  # crds/ files are installed as they are
            continue
        labels = obj["metadata"]["labels"]
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert labels["app.kubernetes.io/name"] == "payguard", where
        assert labels["app.kubernetes.io/instance"] == "payguard", where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where
        assert labels["helm.sh/chart"] == "payguard-0.1.0", where
    for workload in maximal.of_kind("Deployment"):
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selects(workload["spec"]["selector"], pod_labels)


def test_names_follow_the_release() -> None:
    rendered = render(sets=("fullnameOverride=billing",))
    assert sorted(d["metadata"]["name"] for d in rendered.of_kind("Deployment")) == [
        "billing-api",
        "billing-operator",
        "billing-worker",
    ]


def test_the_crds_are_the_files_in_k8s(maximal: Render) -> None:
    """One source of truth: the chart ships k8s/'s CRD byte for byte, and reads its RBAC and peering."""
    k8s, chart = ROOT / "k8s", CHART
    assert (chart / "crds" / "failedoperation-crd.yaml").read_bytes() == (
        k8s / "failedoperation-crd.yaml"
    ).read_bytes()
    assert (chart / "files" / "operator-rbac.yaml").read_bytes() == (k8s / "operator-rbac.yaml").read_bytes()
    assert (chart / "files" / "kopf-peering.yaml").read_bytes() == (k8s / "kopf-peering.yaml").read_bytes()
    k8s_peering_crd = next(
        doc
        for doc in yaml.safe_load_all((k8s / "kopf-peering.yaml").read_text())
        if doc["kind"] == "CustomResourceDefinition"
    )
    assert yaml.safe_load((chart / "crds" / "kopfpeering-crd.yaml").read_text()) == k8s_peering_crd
    rendered = sorted(crd["metadata"]["name"] for crd in maximal.of_kind("CustomResourceDefinition"))
    assert rendered == ["failedoperations.payguard.dev", "kopfpeerings.kopf.dev"]


def test_notes_say_what_to_do_next() -> None:
    done = helm("install", "payguard", str(CHART), "--dry-run=client", "--namespace", "payments")
    notes = done.stdout.partition("NOTES:")[2]
    for expected in (
        "payguard-database (key DATABASE_URL)",
        "payguard-jwt (key PAYGUARD_JWT_SECRET)",
        "payguard-stripe (keys STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRETS)",
        "docs/helm.md",
        "kubectl port-forward -n payments service/payguard-api 8000:8000",
        "kubectl get fo -n payments",
        "emails wait in the outbox as held",
        "monitoring.prometheusOperator=auto",
    ):
        assert expected in notes, expected
