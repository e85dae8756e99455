"""Payments: the Stripe gateway (official SDK, `api_base` configurable)."""
