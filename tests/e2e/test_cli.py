"""`payguard` at a terminal: a mistake gets exit 2 and one line that names it, never a traceback."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import jwt
import pytest

from app.cli import parser
from app.config import default_data_dir
from tests.fixtures.serve import assert_usage_error, postgres_running, run


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("PAYGUARD_CREDIT_PACKAGES", "not json"),
        (
            "PAYGUARD_CREDIT_PACKAGES",
            '[{"id": "x", "credits": 1, "amount": 5, "currency": "usd"}, '
            '{"id": "x", "credits": 2, "amount": 9, "currency": "usd"}]',
        ),
        ("PAYGUARD_DB_POOL_SIZE", "-3"),
        ("PAYGUARD_DB_POOL_TIMEOUT_S", "-1"),
        ("PAYGUARD_MAX_BODY_BYTES", "-1"),
        ("PAYGUARD_TOKEN_TTL_S", "-5"),
        ("PAYGUARD_KUBE_NAMESPACE", "Not_A_Namespace"),
        ("PAYGUARD_OPERATOR_FINISHED_TTL_S", "0"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(tmp_path: Path, var: str, value: str) -> None:
    result = run(tmp_path / "data", "token", "--user", "u1", **{var: value})
    assert_usage_error(result, var)


def test_the_operator_without_the_kubernetes_driver_is_refused_before_the_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = run(data_dir, "operator")
    assert_usage_error(result, "PAYGUARD_RETRY_DRIVER=kubernetes")
    assert not postgres_running(data_dir)


def test_the_operator_without_a_cluster_says_so_before_the_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    missing = str(tmp_path / "no-kubeconfig")
    result = run(data_dir, "operator", PAYGUARD_RETRY_DRIVER="kubernetes", KUBECONFIG=missing)
    assert_usage_error(result, "no Kubernetes cluster")
    assert not postgres_running(data_dir)


def test_an_operator_whose_metrics_port_is_taken_says_so_before_the_database(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        kubeconfig = tmp_path / "kubeconfig"  # a cluster is named, so the port is what stops it
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
            "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:1'}}]\n"
            "users: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
        )
        env = {
            "KUBECONFIG": str(kubeconfig),
            "PAYGUARD_RETRY_DRIVER": "kubernetes",
            "PAYGUARD_OPERATOR_METRICS_HOST": "127.0.0.1",
            "PAYGUARD_OPERATOR_METRICS_PORT": str(port),
        }
        result = run(tmp_path / "data", "operator", timeout=30, **env)
    assert_usage_error(
        result, f"PAYGUARD_OPERATOR_METRICS_PORT {port}: cannot listen (Address already in use)"
    )
    assert not (tmp_path / "data").exists()


def test_migrate_to_an_unknown_revision_is_one_line_and_exit_2(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = run(data_dir, "migrate", "--revision", "nonsense")
    assert_usage_error(result, "nonsense")
    assert not postgres_running(data_dir)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["token", "--user", "u1", "--ttl", "0"], "--ttl"),  # would print a token that is already expired
        (["token", "--user", "u1", "--ttl", "-60"], "--ttl"),
        (["token", "--user", "u1", "--ttl", "soon"], "--ttl"),
        (["token", "--user", ""], "--user"),  # the server refuses an empty sub
        (["token", "--user", "u\t1"], "--user"),
        (["token", "--user", "u" * 256], "--user"),
        (["token"], "--user"),
        (["migrate", "--revision", ""], "--revision"),
        (["serve", "--port", "70000"], "--port"),
        (["worker", "--metrics-port", "-1"], "--metrics-port"),
        (["send-test-event", "--intent", "pi_1", "--amount", "ten"], "--amount"),
        (["launch"], "launch"),
    ],
    ids=[
        "ttl-0",
        "ttl-negative",
        "ttl-word",
        "user-empty",
        "user-tab",
        "user-long",
        "no-user",
        "revision-empty",
        "port",
        "metrics-port",
        "amount",
        "command",
    ],
)
def test_a_bad_argument_is_one_line_and_exit_2(tmp_path: Path, args: list[str], named: str) -> None:
    result = run(tmp_path / "data", *args, timeout=30)
    assert_usage_error(result, named)
    assert not (tmp_path / "data").exists()  # refused before anything was touched


def test_token_lives_as_long_as_asked(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    flag = run(data_dir, "token", "--user", "u1", "--ttl", "60")
    setting = run(data_dir, "token", "--user", "u1", "--admin", PAYGUARD_TOKEN_TTL_S="120")
    default = run(data_dir, "token", "--user", "u1")
    lifetimes = []
    for result in (flag, setting, default):
        assert result.returncode == 0, result.stderr
        claims = jwt.decode(result.stdout.strip(), options={"verify_signature": False})
        assert claims["sub"] == "u1"
        lifetimes.append(claims["exp"] - claims["iat"])
    assert lifetimes == [60, 120, 24 * 3600]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["serve", "migrate", "token", "PAYGUARD_DATA_DIR", "DATABASE_URL"]),
        (
            ["serve"],
            [
                "--host",
                "127.0.0.1",
                "--port",
                "8000",
                "DATABASE_URL",
                "PAYGUARD_DATA_DIR",
                "PAYGUARD_JWT_SECRET",
                "PAYGUARD_JWKS_URL",
                "STRIPE_SECRET_KEY",
            ],
        ),
        (["migrate"], ["--revision", "head", "DATABASE_URL", "PAYGUARD_DATA_DIR"]),
        (
            ["token"],
            [
                "--user",
                "--admin",
                "--ttl",
                "PAYGUARD_TOKEN_TTL_S",
                "86400",
                "PAYGUARD_JWT_SECRET",
                "PAYGUARD_DATA_DIR",
            ],
        ),
    ],
    ids=["payguard", "serve", "migrate", "token"],
)
def test_help_names_each_option_its_default_its_variable_and_the_data_dir(
    command: list[str], expected: list[str]
) -> None:
    result = run(None, *command, "--help", timeout=30)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for word in [*expected, f"default {default_data_dir()}"]:
        assert word in text, word


def test_every_option_of_every_command_is_described() -> None:
    (commands,) = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help and len(action.help) > 10, (name, action.option_strings)


def test_a_worker_whose_metrics_port_is_taken_says_so_and_touches_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(tmp_path / "data", "worker", "--metrics-port", str(port), timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"payguard: --metrics-port {port}: cannot listen (Address already in use)"
    assert not (tmp_path / "data").exists()
