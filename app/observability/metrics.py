"""Prometheus metrics: RED per route, and the domain counters alerts are built on."""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import Counter, Gauge, Histogram


class PurchaseKind(StrEnum):
    CREDITS = "credits"
    LEAD = "lead"
    TICKETS = "tickets"  # a reservation's checkout


class ReservationOutcome(StrEnum):
    HELD = "held"
    SOLD_OUT = "sold_out"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # marked by the cleanup job
    COMPLETED = "completed"  # paid in time: tickets issued
    HONOURED = "honoured"  # paid after it expired or was cancelled, and there was still room
    REFUNDED = "refunded"  # paid too late, no room left: the payment went back


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
RESERVATIONS = Counter(
    "payguard_reservations_total", "Ticket holds by outcome (ReservationOutcome)", ["outcome"]
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


class WebhookReceipt(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    BAD_SIGNATURE = "bad_signature"  # missing, forged or stale
    BAD_EVENT = "bad_event"  # not JSON, or not a Stripe event
    NOT_CONFIGURED = "not_configured"


class WorkOutcome(StrEnum):
    """What one attempt at a queued item (event, email, retry) came to."""

    DONE = "done"  # handled, sent, succeeded
    IGNORED = "ignored"  # an event we do not act on
    HELD = "held"  # an email waiting for SMTP to be configured
    FAILED = "failed"  # will be retried
    DEAD = "dead"  # no more retries: a human looks at its failed operation
    FENCED = "fenced"  # this worker lost its lease: its commit was refused


class Queue(StrEnum):
    WEBHOOK_EVENTS = "webhook_events"
    OUTBOX = "outbox"
    RETRIES = "retries"  # failed operations due for another attempt


WEBHOOKS_RECEIVED = Counter(
    "payguard_webhooks_received_total",
    "Stripe deliveries by event type (handled types by name, else other) and outcome (WebhookReceipt)",
    ["type", "outcome"],
)
WORK_DONE = Counter(
    "payguard_work_items_total",
    "Attempts at queued work by queue (Queue), kind (event type, email kind, operation kind) and outcome",
    ["queue", "kind", "outcome"],
)
WEBHOOK_LAG = Histogram(
    "payguard_webhook_lag_seconds",
    "From an event's receipt to the commit of its handling",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
WORKER_CLAIMS = Counter("payguard_worker_claims_total", "Items claimed by workers, by queue", ["queue"])
LEASE_TAKEOVERS = Counter(
    "payguard_worker_lease_takeovers_total",
    "Items claimed whose previous lease had expired (its worker died or stalled), by queue",
    ["queue"],
)
# read from the database at each scrape, so any replica reports the same, and a stall shows even when
# nothing fails
QUEUE_DEPTH = Gauge("payguard_queue_depth", "Items waiting in each queue (Queue)", ["queue"])
QUEUE_OLDEST_AGE = Gauge(
    "payguard_queue_oldest_age_seconds",
    "Age of the oldest item waiting in each queue (0 when empty)",
    ["queue"],
)
FAILED_OPERATIONS = Gauge(
    "payguard_failed_operations",
    "Failed operations by kind and status (dead ones need a human)",
    ["kind", "status"],
)
EMAILS_HELD = Gauge("payguard_emails_held", "Emails waiting for SMTP to be configured")
FAILED_OPERATIONS_OLDEST_OPEN_AGE = Gauge(
    "payguard_failed_operations_oldest_open_age_seconds",
    "Age of the oldest failed operation still pending or retrying, since it first failed (0 when none)",
)
RESERVATIONS_OLDEST_ACTIVE_AGE = Gauge(
    "payguard_reservations_oldest_active_age_seconds",
    "Age of the oldest ticket hold still marked active (0 when none): past its TTL means cleanup stalled",
)


class MissedSource(StrEnum):
    """Where reconciliation found what Stripe settled and we never heard of."""

    EVENTS = "events"  # an event in Stripe's list that was never delivered
    INTENTS = "intents"  # an intent still pending here that Stripe says is settled


# read from job_runs at each scrape (and set by the process that ran the job), so every replica
# reports the same, after restarts too
JOB_LAST_SUCCESS = Gauge(
    "payguard_job_last_success_timestamp_seconds",
    "When each job (cleanup, health, reconcile) last finished a run that succeeded, in Unix seconds",
    ["job"],
)
RECONCILE_MISSED_RECENT = Gauge(
    "payguard_reconcile_missed_events_recent",
    "Events reconciliation stored that had never reached us, found by runs that finished in the last hour,"
    " by source (MissedSource); read from job_runs at each scrape",
    ["source"],
)
RECONCILE_MISSED = Counter(
    "payguard_reconcile_missed_events_total",
    "Events reconciliation stored that had never reached us, by source (MissedSource)",
    ["source"],
)


class ErrorSource(StrEnum):
    """Where a recorded error came from (a client's own `source` text is not a label: unbounded)."""

    CLIENT = "client"  # POST /v1/errors
    SERVER = "server"  # an unhandled exception answered with 500


ERRORS_RECORDED = Counter(
    "payguard_errors_recorded_total",
    "Error logs stored, by source (ErrorSource) and severity (debug, info, warning, error, critical)",
    ["source", "severity"],
)
