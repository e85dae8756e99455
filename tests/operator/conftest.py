"""Fixtures for the operator's tests; they live in tests/fixtures and are only registered here."""

from tests.fixtures.kube import kube

__all__ = ["kube"]
