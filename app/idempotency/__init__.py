"""Idempotency keys: replay, conflict detection and atomic phases with fencing."""
