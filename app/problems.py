"""Typed service errors and their one mapping to RFC 9457 problem details."""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_JSON = "application/problem+json"


class ServiceError(Exception):
    """A failure a client can act on. Subclasses fix the status and the stable `type` slug."""

    status: ClassVar[int] = 400
    type: ClassVar[str] = "bad-request"
    title: ClassVar[str] = "Bad request"
    # a business answer, stored under the Idempotency-Key and replayed; False for "try again later"
    final: ClassVar[bool] = True
    headers: dict[str, str]

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        self.headers = {}

    def problem(self) -> dict[str, Any]:
        return problem(self.status, self.type, self.title, self.detail, **self.extra)


def problem(status: int, type_: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": type_, "title": title, "status": status, "detail": detail, **extra}


class NotFound(ServiceError):
    status, type, title = 404, "not-found", "Not found"


class IdempotencyKeyRequired(ServiceError):
    status, type, title = 400, "idempotency-key-required", "Idempotency-Key header required"


class IdempotencyKeyInvalid(ServiceError):
    status, type, title = 400, "idempotency-key-invalid", "Idempotency-Key is not valid"


class IdempotencyKeyInUse(ServiceError):
    status, type, title = 409, "idempotency-key-in-use", "Idempotency-Key is in use"


class IdempotencyKeyMismatch(ServiceError):
    status, type, title = 422, "idempotency-key-mismatch", "Idempotency-Key reused with another request"


class InvalidJson(ServiceError):
    status, type, title = 400, "invalid-json", "The body is not valid JSON"


class UnsupportedMediaType(ServiceError):
    status, type, title = 415, "unsupported-media-type", "Unsupported media type"


class InvalidCursor(ServiceError):
    status, type, title = 400, "invalid-cursor", "Invalid pagination cursor"


class RateLimited(ServiceError):
    status, type, title = 429, "rate-limited", "Too many requests"
    final = False

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail, retry_after=retry_after_s)
        self.headers = {"Retry-After": str(retry_after_s)}


class PaymentsNotConfigured(ServiceError):
    status, type, title = 503, "payments-not-configured", "Payments are not configured"


class PaymentProviderError(ServiceError):
    status, type, title = 502, "payment-provider-error", "The payment provider failed"


class PaymentKeyConflict(ServiceError):
    """Stripe answered `idempotency_error`: our key was used with other parameters. Never retried."""

    status, type, title = 502, "payment-provider-conflict", "The payment provider refused the purchase"


class DatabaseTimeout(ServiceError):
    status, type, title = 503, "database-timeout", "The database did not answer in time"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": "1"}


class DatabaseUnavailable(ServiceError):
    status, type, title = 503, "database-unavailable", "The database is unavailable"
    final = False

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after_s)}
