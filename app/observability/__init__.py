"""Metrics, structured logging and request ids."""
