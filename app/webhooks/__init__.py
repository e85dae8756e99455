"""Stripe webhooks: verified, stored once, acknowledged at once, handled later by the worker."""
