"""Alembic migrations (shipped inside the distribution so `payguard migrate` finds them)."""
