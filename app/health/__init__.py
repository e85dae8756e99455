"""Liveness, readiness and the Prometheus scrape endpoint."""
