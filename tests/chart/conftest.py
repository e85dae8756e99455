"""Renders of the chart shared by the chart tests: helm runs once per distinct render in a session."""

from __future__ import annotations

import pytest

from tests.fixtures.chart import MONITORING_API, VALUES_MAX, Render, render


@pytest.fixture(scope="session")
def defaults() -> Render:
    """The chart as `helm install payguard charts/payguard` renders it on a cluster without Prometheus Operator."""
    return render()


@pytest.fixture(scope="session")
def maximal() -> Render:
    """Every optional part on (tests/chart/values-max.yaml), on a cluster serving monitoring.coreos.com/v1."""
    return render((VALUES_MAX,), api_versions=(MONITORING_API,))
