"""kind end to end: both images built with Docker, the chart installed with helm into a kind cluster,
then what a cluster's operator would do: a purchase and a webhook over the API, an email that fails
into a FailedOperation seen with `kubectl get fo` and retried by annotation, a CronJob run by hand.

Runs where a Docker engine and kind exist; skipped with the reason everywhere else (these machines
have no Docker engine). One cluster per run, with a unique name and its own kubeconfig (the user's
~/.kube/config is never touched), deleted at the end whatever happened. docs/kubernetes.md.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from tests.fixtures.app import token
from tests.fixtures.serve import free_port
from tests.fixtures.tools import kube_tools
from tests.fixtures.webhooks import intent_event, signed

ROOT = Path(__file__).resolve().parents[2]
RELEASE = "payguard"
NAMESPACE = "payguard-e2e"
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"
JWT_SECRET = secrets.token_urlsafe(48)
WEBHOOK_SECRET = f"whsec_e2e_{secrets.token_hex(16)}"
SETUP_TIMEOUT_S = 1800  # a cold machine: node image pull, two image builds, the chart's rollout
T = TypeVar("T")

# what the chart gets on top of k8s/dev/values.yaml (the `skaffold dev` values)
E2E_VALUES: dict[str, Any] = {
    # webhooks are checked with the secret in payguard-stripe; no call to Stripe leaves the pod
    "stripe": {"existingSecret": "payguard-stripe", "apiBase": "http://127.0.0.1:1"},
    "smtp": {"host": "127.0.0.1", "port": 1, "starttls": False},  # nothing listens: every send fails
    "jobs": {"reconcile": {"enabled": False}},  # there is no Stripe to reconcile with
    "config": {
        "PAYGUARD_RETRY_BASE_DELAY_S": "3600",  # no retry on its own during the test: only the annotation's
        "PAYGUARD_OPERATOR_RESYNC_S": "5",
    },
}


def why_not_runnable() -> str | None:
    """None when this machine can run the suite, else what is missing, in one line."""
    if shutil.which("docker") is None:
        return "docker is not on PATH"
    try:  # the docker CLI without an engine behind it is common (these machines have one)
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info failed: no answer in 30 s"
    if info.returncode != 0:
        lines = (info.stderr or info.stdout).strip().splitlines()
        return f"docker info failed: {lines[-1] if lines else f'exit {info.returncode}'}"
    if shutil.which("kind") is None:
        return "kind is not on PATH"
    return None


def run(*command: str | Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, command))}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def eventually(check: Callable[[], T | None], what: str, timeout_s: float = 180, every_s: float = 2) -> T:
    """The first truthy result of `check`, polled until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(every_s)


@dataclass
class Cluster:
    name: str
    kubeconfig: Path
    tools: Path  # helm and kubectl

    def kubectl(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(
            self.tools / "kubectl",
            "--kubeconfig",
            self.kubeconfig,
            "-n",
            NAMESPACE,
            *args,
            timeout=timeout,
            check=check,
        )

    def helm(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return run(
            self.tools / "helm", "--kubeconfig", self.kubeconfig, "-n", NAMESPACE, *args, timeout=timeout
        )

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def diagnose(self) -> str:
        """What to read when something failed: objects, events, and every payguard container's log."""
        parts = []
        for args in (
            ["get", "all,failedoperations,jobs", "-o", "wide"],
            ["get", "events", "--sort-by=.lastTimestamp"],
            ["describe", "pods"],
            ["logs", "-l", INSTANCE, "--all-containers", "--prefix", "--tail=200"],
        ):
            result = self.kubectl(*args, check=False, timeout=60)
            parts.append(f"$ kubectl {' '.join(args)}\n{result.stdout}{result.stderr}")
        return "\n".join(parts)


def build_and_load(cluster: Cluster, tag: str) -> dict[str, str]:
    """Both images from the one Dockerfile, loaded into the cluster's nodes: image value -> reference."""
    images = {"image": f"payguard:{tag}", "operatorImage": f"payguard-operator:{tag}"}
    for target, reference in zip(("api", "operator"), images.values(), strict=True):
        run("docker", "build", "--target", target, "--tag", reference, ".", timeout=1200)
        run("kind", "load", "docker-image", "--name", cluster.name, reference, timeout=600)
    return images


def chart_args(images: dict[str, str], workdir: Path) -> list[str]:
    """The chart and its values: the `skaffold dev` values, then E2E_VALUES and the loaded images."""
    values = dict(E2E_VALUES)
    for key, reference in images.items():
        repository, tag = reference.split(":")
        values[key] = {"repository": repository, "tag": tag, "pullPolicy": "Never"}  # loaded, never pulled
    values_file = workdir / "e2e-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    return [str(ROOT / "charts/payguard"), "-f", str(ROOT / "k8s/dev/values.yaml"), "-f", str(values_file)]


def install(cluster: Cluster, images: dict[str, str], workdir: Path) -> None:
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl("apply", "-f", str(ROOT / "k8s/dev/postgres.yaml"))
    cluster.kubectl("rollout", "status", "deployment/postgres", "--timeout=300s", timeout=330)
    cluster.kubectl(
        "create", "secret", "generic", "payguard-jwt", f"--from-literal=PAYGUARD_JWT_SECRET={JWT_SECRET}"
    )
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "payguard-stripe",
        "--from-literal=STRIPE_SECRET_KEY=sk_test_e2e_never_used",
        f"--from-literal=STRIPE_WEBHOOK_SECRETS={WEBHOOK_SECRET}",
    )
    cluster.helm("install", RELEASE, *chart_args(images, workdir), "--wait", "--timeout=10m")


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = why_not_runnable()
    if reason is not None:
        pytest.skip(f"kind e2e: needs a Docker engine and kind; {reason}")
    workdir = tmp_path_factory.mktemp("kind")
    run_id = uuid.uuid4().hex[:8]
    made = Cluster(f"payguard-e2e-{run_id}", workdir / "kubeconfig", kube_tools())
    failed_before = request.session.testsfailed
    try:
        run(
            "kind",
            "create",
            "cluster",
            "--name",
            made.name,
            "--config",
            ROOT / "k8s/kind-config.yaml",
            "--kubeconfig",
            made.kubeconfig,
            "--wait=5m",
            timeout=600,
        )
        try:
            install(made, build_and_load(made, f"e2e-{run_id}"), workdir)
        except BaseException:
            print(made.diagnose(), file=sys.__stderr__)  # the log of a CI run says why
            raise
        yield made
        if request.session.testsfailed > failed_before:
            print(made.diagnose(), file=sys.__stderr__)
    finally:
        if os.environ.get("PAYGUARD_E2E_KEEP_CLUSTER") != "1":  # set it to look around after a failure
            run(
                "kind",
                "delete",
                "cluster",
                "--name",
                made.name,
                "--kubeconfig",
                made.kubeconfig,
                timeout=300,
                check=False,
            )


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[httpx.Client]:
    """The API Service, port-forwarded to 127.0.0.1, as an HTTP client."""
    (service,) = cluster.get("service", "-l", f"{INSTANCE},app.kubernetes.io/component=api")["items"]
    (port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "http"]
    local = free_port()
    forward = subprocess.Popen(
        [
            str(cluster.tools / "kubectl"),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "-n",
            NAMESPACE,
            "port-forward",
            f"service/{service['metadata']['name']}",
            f"{local}:{port}",
            "--address=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{local}", timeout=30) as client:

            def ready() -> bool:
                try:
                    return client.get("/health/ready").status_code == 200
                except httpx.TransportError:
                    return False

            eventually(ready, "the API answers through the port-forward", timeout_s=60, every_s=1)
            yield client
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def bearer(
    user: str, *, admin: bool = False, email: str | None = None, key: str | None = None
) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token(user, admin=admin, secret=JWT_SECRET, email=email)}"}
    return headers | ({"Idempotency-Key": key} if key else {})


def test_the_skip_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs everywhere: without Docker or kind the suite says why it skips, in one line."""

    def tool(name: str, script: str) -> None:
        (tmp_path / name).write_text(f"#!/bin/sh\n{script}\n")
        (tmp_path / name).chmod(0o755)

    monkeypatch.setenv("PATH", str(tmp_path))
    assert why_not_runnable() == "docker is not on PATH"
    down = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"
    tool("docker", f"echo 'Server:' >&2; echo '{down}' >&2; exit 1")
    assert why_not_runnable() == f"docker info failed: {down}"
    tool("docker", "exit 0")
    assert why_not_runnable() == "kind is not on PATH"
    tool("kind", "exit 0")
    assert why_not_runnable() is None


@pytest.mark.timeout(600)  # the first call downloads helm (npm)
def test_the_e2e_values_render_with_the_chart(tmp_path: Path) -> None:
    """Runs everywhere: what this suite assumes of the chart holds in `helm template`, without a cluster."""
    if not (ROOT / "charts/payguard/Chart.yaml").is_file():
        pytest.skip("charts/payguard is not in this tree")
    images = {"image": "payguard:e2e", "operatorImage": "payguard-operator:e2e"}
    rendered = run(kube_tools() / "helm", "template", RELEASE, *chart_args(images, tmp_path), "-n", NAMESPACE)
    objects = [o for o in yaml.safe_load_all(rendered.stdout) if o]

    def of(kind: str, component: str) -> list[dict[str, Any]]:
        return [
            o
            for o in objects
            if o["kind"] == kind
            and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        ]

    (service,) = of("Service", "api")  # what the `api` fixture port-forwards
    assert "http" in {p["name"] for p in service["spec"]["ports"]}
    assert (
        len(of("Deployment", "api"))
        == len(of("Deployment", "worker"))
        == len(of("Deployment", "operator"))
        == 1
    )
    cronjobs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "CronJob"}
    assert any(name.endswith("-cleanup") for name in cronjobs), sorted(cronjobs)
    assert not any(name.endswith("-reconcile") for name in cronjobs), "E2E_VALUES turns reconcile off"
    (worker,) = of("Deployment", "worker")
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["SMTP_HOST"], env["SMTP_PORT"], env["PAYGUARD_RETRY_DRIVER"]) == (
        "127.0.0.1",
        "1",
        "kubernetes",
    )
    assert env["PAYGUARD_RETRY_BASE_DELAY_S"] == "3600"
    assert (container["image"], container["imagePullPolicy"]) == ("payguard:e2e", "Never")


@pytest.mark.timeout(SETUP_TIMEOUT_S)
def test_every_payguard_pod_is_ready_and_runs_as_the_images_user(cluster: Cluster) -> None:
    deployments = cluster.get("deployment", "-l", INSTANCE)["items"]
    components = {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in deployments}
    assert {"api", "worker", "operator"} <= components
    for deployment in deployments:
        status = deployment["status"]
        assert status.get("readyReplicas") == deployment["spec"]["replicas"], deployment["metadata"]["name"]
        name = deployment["metadata"]["name"]
        uid = cluster.kubectl("exec", f"deployment/{name}", "--", "id", "-u").stdout.strip()
        assert uid == "10001", f"{name} runs as uid {uid}"
        # the root filesystem is read-only; /tmp (an emptyDir) is where writes go
        written = cluster.kubectl("exec", f"deployment/{name}", "--", "touch", "/opt/venv/x", check=False)
        assert written.returncode != 0 and "Read-only file system" in written.stderr, written
        cluster.kubectl("exec", f"deployment/{name}", "--", "touch", "/tmp/x")


@pytest.mark.timeout(SETUP_TIMEOUT_S)
def test_a_lead_purchase_whose_email_fails_is_a_failed_operation_kubectl_retries(
    cluster: Cluster, api: httpx.Client
) -> None:
    admin = bearer("e2e-admin", admin=True)
    granted = api.post(
        "/admin/credits/grants",
        json={"user_id": "alice", "credits": 50, "reason": "e2e"},
        headers=admin | {"Idempotency-Key": "e2e-grant-alice"},
    )
    assert granted.status_code == 201, granted.text
    lead = api.post(
        "/admin/leads", json={"title": "Roof repair", "price_credits": 20, "details": {}}, headers=admin
    )
    assert lead.status_code == 201, lead.text
    alice = bearer("alice", email="alice@example.com", key="e2e-buy-lead")
    bought = api.post(f"/v1/leads/{lead.json()['id']}/purchase", headers=alice)
    assert bought.status_code == 201, bought.text
    assert bought.json()["balance"] == 30

    # the worker's first send fails (SMTP on a closed port); the operator mirrors the failure
    def failed_email() -> dict[str, Any] | None:
        items = cluster.get("failedoperations", "-l", "payguard.dev/kind=email")["items"]
        return items[0] if items and items[0].get("status", {}).get("attempts") == 1 else None

    fo = eventually(failed_email, "a FailedOperation for the email, after its first attempt")
    name = fo["metadata"]["name"]
    assert fo["status"]["phase"] == "Pending" and "127.0.0.1:1" in fo["status"]["lastError"], fo["status"]
    table = cluster.kubectl("get", "fo").stdout
    assert name in table and "PHASE" in table and "Pending" in table, table

    # the next retry is an hour away (E2E_VALUES); the annotation makes it now
    cluster.kubectl("annotate", "fo", name, "payguard.dev/retry-now=1")

    def retried() -> dict[str, Any] | None:
        found: dict[str, Any] = cluster.get("fo", name)
        done = found["status"].get("attempts") == 2 and "payguard.dev/retry-now" not in found["metadata"].get(
            "annotations", {}
        )
        return found if done else None

    fo = eventually(retried, f"{name}: a second attempt, and the annotation removed")
    assert fo["status"]["phase"] == "Retrying", fo["status"]
    events = cluster.get("events", "--field-selector", f"involvedObject.name={name}")["items"]
    assert {"RetryRequested", "RetryFailed"} <= {e["reason"] for e in events}


@pytest.mark.timeout(SETUP_TIMEOUT_S)
def test_a_signed_webhook_is_stored_once_and_handled_by_the_worker(api: httpx.Client) -> None:
    event = intent_event("payment_intent.succeeded", f"pi_e2e_{secrets.token_hex(8)}", 4500)
    body, headers = signed(event, secret=WEBHOOK_SECRET)
    first = api.post("/webhooks/stripe", content=body, headers=headers)
    assert (first.status_code, first.json()) == (200, {"received": True, "duplicate": False}), first.text
    again = api.post("/webhooks/stripe", content=body, headers=headers)
    assert again.json() == {"received": True, "duplicate": True}
    forged_body, forged_headers = signed(event, secret="whsec_not_ours")
    assert api.post("/webhooks/stripe", content=forged_body, headers=forged_headers).status_code == 400

    # the API runs no worker (PAYGUARD_RUN_WORKER=false): the worker Deployment handles it, and a
    # replay's dry run lists only events the worker is done with
    window = {"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z", "dry_run": True}

    def handled() -> bool:
        replay = api.post("/admin/webhooks/replay", json=window, headers=bearer("e2e-admin", admin=True))
        assert replay.status_code == 200, replay.text
        return event["id"] in {e["event_id"] for e in replay.json()["events"]}

    eventually(handled, f"the worker handled {event['id']}")


@pytest.mark.timeout(SETUP_TIMEOUT_S)
def test_the_cleanup_cronjob_runs_once_on_demand(cluster: Cluster, api: httpx.Client) -> None:
    (cronjob,) = [
        c
        for c in cluster.get("cronjob", "-l", INSTANCE)["items"]
        if c["metadata"]["name"].endswith("-cleanup")
    ]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    job = f"e2e-cleanup-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "job", job, f"--from=cronjob/{cronjob['metadata']['name']}")
    cluster.kubectl("wait", f"job/{job}", "--for=condition=Complete", "--timeout=300s", timeout=330)
    printed = cluster.kubectl("logs", f"job/{job}").stdout  # the run record, one JSON line on stdout
    record = json.loads(next(line for line in printed.splitlines() if line.startswith('{"id"')))
    assert (record["job"], record["outcome"]) == ("cleanup", "succeeded"), record
    runs = api.get("/admin/jobs/runs", headers=bearer("e2e-admin", admin=True))
    assert record["id"] in {r["id"] for r in runs.json()["items"]}, runs.text
