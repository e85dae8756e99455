"""skaffold.yaml, the kind cluster config and the dev manifests, checked without skaffold, kind or Docker.

skaffold is not installed here, so its config is read as data: each artifact names a Dockerfile
and a build target that exist, the helm release deploys charts/payguard with both images wired
to the chart's image values the way skaffold fills them, and the dev profile forwards a port the
chart's API Service really has (the chart is rendered with the real helm, with skaffold's values),
whose pods run the images skaffold built with arguments the payguard CLI accepts.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.cli import parser
from tests.fixtures.dockerfile import parse
from tests.fixtures.tools import kube_tools

ROOT = Path(__file__).resolve().parents[2]
SKAFFOLD = ROOT / "skaffold.yaml"
KIND_CONFIG = ROOT / "k8s" / "kind-config.yaml"
DEV_MANIFESTS = ROOT / "k8s" / "dev" / "postgres.yaml"
CHART = "charts/payguard"
IMAGE_VALUES = {"api": "image", "operator": "operatorImage"}  # build target -> the chart's value
HELM_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def skaffold() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(SKAFFOLD.read_text())
    return config


def artifacts_by_target(skaffold: dict[str, Any]) -> dict[str, str]:
    return {a["docker"]["target"]: a["image"] for a in skaffold["build"]["artifacts"]}


def release(skaffold: dict[str, Any]) -> dict[str, Any]:
    (only,) = skaffold["deploy"]["helm"]["releases"]
    found: dict[str, Any] = only
    return found


def template_name(image: str) -> str:
    """How skaffold names an artifact inside a template: `/`, `-`, `.` and `:` become `_`."""
    return re.sub(r"[/\-.:]", "_", image)


def expand(templates: dict[str, str], images: dict[str, tuple[str, str, str]]) -> dict[str, str]:
    """setValueTemplates filled as skaffold fills them: image -> (repo, tag, digest); an empty digest
    (an image loaded into kind, not pushed) leaves a trailing "@" that skaffold drops."""
    fields: dict[str, str] = {}
    for image, (repo, tag, digest) in images.items():
        name = template_name(image)
        fields |= {f"IMAGE_REPO_{name}": repo, f"IMAGE_TAG_{name}": tag, f"IMAGE_DIGEST_{name}": digest}

    def fill(template: str) -> str:
        return re.sub(r"\{\{\s*\.(\w+)\s*\}\}", lambda m: fields[m.group(1)], template).removesuffix("@")

    return {key: fill(value) for key, value in templates.items()}


def test_the_config_is_a_skaffold_v4_config(skaffold: dict[str, Any]) -> None:
    # v4beta11: read by every skaffold since 2.12, and upgraded in memory by newer ones
    assert re.fullmatch(r"skaffold/v4beta\d+", skaffold["apiVersion"]), skaffold["apiVersion"]
    assert skaffold["kind"] == "Config"


def test_each_artifact_builds_a_target_of_an_existing_dockerfile(skaffold: dict[str, Any]) -> None:
    artifacts = skaffold["build"]["artifacts"]
    for artifact in artifacts:
        context = ROOT / artifact.get("context", ".")
        dockerfile = context / artifact["docker"].get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{artifact['image']}: no {dockerfile}"
        stages = parse(dockerfile).stages
        assert artifact["docker"]["target"] in stages, f"{artifact['image']}: stages are {list(stages)}"
    assert sorted(artifacts_by_target(skaffold)) == sorted(IMAGE_VALUES), "one artifact per image"
    assert len({a["image"] for a in artifacts}) == len(artifacts)


def test_the_release_deploys_the_chart_with_both_images(skaffold: dict[str, Any]) -> None:
    chart = release(skaffold)
    assert chart["chartPath"] == CHART
    for values_file in chart.get("valuesFiles", []):
        assert (ROOT / values_file).is_file(), values_file
    images = {
        image: ("repo-" + target, "tag-" + target, "")
        for target, image in artifacts_by_target(skaffold).items()
    }
    values = expand(chart["setValueTemplates"], images)
    # every built image reaches the chart value of its own target, and nothing else is set
    expected = {}
    for target, key in IMAGE_VALUES.items():
        expected |= {f"{key}.repository": f"repo-{target}", f"{key}.tag": f"tag-{target}"}
    assert values == expected


def test_a_pushed_image_is_deployed_by_tag_and_digest(skaffold: dict[str, Any]) -> None:
    images = {
        image: ("registry.example/x", "v1", "sha256:" + "a" * 64)
        for image in artifacts_by_target(skaffold).values()
    }
    values = expand(release(skaffold)["setValueTemplates"], images)
    assert (
        values["image.tag"] == "v1@sha256:" + "a" * 64
    )  # the chart writes repository:tag, a valid reference


def test_skaffold_dev_forwards_the_api(skaffold: dict[str, Any]) -> None:
    (dev,) = [p for p in skaffold["profiles"] if p["name"] == "dev"]
    assert {"command": "dev"} in dev["activation"], "`skaffold dev` turns the profile on by itself"
    (forward,) = dev["portForward"]
    assert forward["resourceType"] == "service"
    assert forward["namespace"] == release(skaffold)["namespace"]


@pytest.mark.timeout(600)  # the first call downloads helm (npm)
def test_the_chart_renders_with_skaffolds_values_and_has_the_forwarded_service(
    skaffold: dict[str, Any],
) -> None:
    if not (ROOT / CHART / "Chart.yaml").is_file():
        pytest.skip(f"{CHART} is not in this tree")
    chart = release(skaffold)
    images = {image: (image, "dev0123", "") for image in artifacts_by_target(skaffold).values()}
    command = [
        str(kube_tools() / "helm"),
        "template",
        chart["name"],
        str(ROOT / CHART),
        "-n",
        chart["namespace"],
    ]
    for values_file in chart.get("valuesFiles", []):
        command += ["-f", str(ROOT / values_file)]
    for key, value in expand(chart["setValueTemplates"], images).items():
        command += ["--set", f"{key}={value}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=HELM_TIMEOUT_S, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]

    (forward,) = next(p for p in skaffold["profiles"] if p["name"] == "dev")["portForward"]
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    assert forward["resourceName"] in services, f"no Service {forward['resourceName']}: {sorted(services)}"
    ports = [p["port"] for p in services[forward["resourceName"]]["spec"]["ports"]]
    assert forward["port"] in ports

    # the images skaffold built are the ones the pods run
    built = {f"{image}:dev0123" for image in images}
    used = {
        c["image"]
        for o in objects
        if o["kind"] in ("Deployment", "Job", "CronJob")
        for c in _pod_spec(o)["containers"]
    }
    assert used == built, f"pods run {used}, skaffold built {built}"
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job", "CronJob"):
            for container in _pod_spec(obj)["containers"]:
                # the image's ENTRYPOINT (payguard) stays; the chart's args must be a command it accepts
                assert "command" not in container, f"{obj['metadata']['name']} replaces the entrypoint"
                parser().parse_args(container["args"])


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    template = (
        obj["spec"]["jobTemplate"]["spec"]["template"]
        if obj["kind"] == "CronJob"
        else obj["spec"]["template"]
    )
    spec: dict[str, Any] = template["spec"]
    return spec


def test_the_kind_cluster_has_a_control_plane_and_a_worker() -> None:
    config = yaml.safe_load(KIND_CONFIG.read_text())
    assert (config["kind"], config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    roles = [node["role"] for node in config["nodes"]]
    assert roles.count("control-plane") == 1 and roles.count("worker") >= 1, roles
    # a fixed host port would stop a second cluster (the e2e suite makes one per run) from starting
    assert not any("extraPortMappings" in node for node in config["nodes"])


@pytest.mark.parametrize("version", ["1.29.0", "1.35.0"])
def test_the_dev_postgres_manifests_are_valid_kubernetes(version: str) -> None:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run(
        [str(tool), "--strict", "-k", version, str(DEV_MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = sorted(o["kind"] for o in yaml.safe_load_all(DEV_MANIFESTS.read_text()))
    assert kinds == ["Deployment", "Secret", "Service"]
