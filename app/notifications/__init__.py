"""Emails: written to an outbox with the business change, sent and retried by the worker."""
