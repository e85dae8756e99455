"""Prometheus metrics: RED per route, and the domain counters alerts are built on."""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import Counter, Histogram


class PurchaseKind(StrEnum):
    CREDITS = "credits"
    LEAD = "lead"


class PurchaseOutcome(StrEnum):
    CREATED = "created"  # a PaymentIntent exists; credits come when it succeeds
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"  # a business 4xx: unavailable, insufficient credits, not found
    FAILED = "failed"  # 5xx, or the provider refused the purchase for good
    MISMATCH = "mismatch"  # paid amount or currency differs from the purchase


class IdempotencyOutcome(StrEnum):
    REPLAYED = "replayed"
    IN_USE = "in_use"
    MISMATCH = "mismatch"
    TAKEOVER = "takeover"
    FENCED_OUT = "fenced_out"


class CreditReason(StrEnum):
    PURCHASE = "purchase"
    ADMIN = "admin"


class StripeOutcome(StrEnum):
    OK = "ok"
    ERROR = "error"


HTTP_REQUESTS = Counter(
    "payguard_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "payguard_http_request_duration_seconds",
    "HTTP request latency by route and status",
    ["method", "route", "status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PURCHASES = Counter(
    "payguard_purchases_total",
    "Purchases by kind (PurchaseKind) and outcome (PurchaseOutcome)",
    ["kind", "outcome"],
)
IDEMPOTENCY = Counter(
    "payguard_idempotency_total",
    "Idempotency-Key outcomes (IdempotencyOutcome)",
    ["outcome"],
)
RATE_LIMITED = Counter("payguard_rate_limited_total", "Requests refused by a rate limit", ["action"])
DB_TIMEOUTS = Counter("payguard_db_timeouts_total", "Statement, lock or pool timeouts")
DB_UNAVAILABLE = Counter(
    "payguard_db_unavailable_total", "Requests refused because the database could not be reached"
)
STRIPE_REQUESTS = Counter(
    "payguard_stripe_requests_total", "Calls to Stripe by operation and outcome", ["operation", "outcome"]
)
CREDITS_GRANTED = Counter("payguard_credits_granted_total", "Credits granted, by reason", ["reason"])
