"""Talking to Stripe through the official SDK's StripeClient, asynchronously."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import msgspec
import stripe

from app.config import Settings
from app.observability.metrics import STRIPE_REQUESTS, StripeOutcome
from app.problems import PaymentKeyConflict, PaymentProviderError, PaymentsNotConfigured

log = logging.getLogger("payguard.payments")
_CREATE_INTENT = "create_payment_intent"  # the operation label of STRIPE_REQUESTS
_REFUND = "refund_payment"
_LIST_EVENTS = "list_events"
_RETRIEVE_INTENT = "retrieve_payment_intent"


class PaymentIntent(msgspec.Struct, frozen=True):
    id: str
    client_secret: str
    status: str
    amount: int
    currency: str


class PaymentGateway:
    """Every call carries an idempotency key derived from ours, so a resend never charges twice."""

    def __init__(self, settings: Settings) -> None:
        self._client: stripe.StripeClient | None = None
        if settings.stripe_secret_key:
            self._client = stripe.StripeClient(
                settings.stripe_secret_key,
                stripe_version=settings.stripe_api_version,
                base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else None,
                max_network_retries=settings.stripe_max_network_retries,
                http_client=stripe.HTTPXClient(timeout=settings.stripe_timeout_s),
            )

    @property
    def configured(self) -> bool:
        return self._client is not None

    def require(self) -> stripe.StripeClient:
        if self._client is None:
            raise PaymentsNotConfigured("STRIPE_SECRET_KEY is not set: payments are switched off")
        return self._client

    async def create_payment_intent(
        self, *, amount: int, currency: str, metadata: dict[str, str], idempotency_key: str
    ) -> PaymentIntent:
        client = self.require()
        params: Any = {
            "amount": amount,
            "currency": currency,
            "metadata": metadata,
            "automatic_payment_methods": {"enabled": True},
        }
        try:
            intent = await client.v1.payment_intents.create_async(
                params, {"idempotency_key": idempotency_key}
            )
        except stripe.IdempotencyError as exc:
            STRIPE_REQUESTS.labels(_CREATE_INTENT, StripeOutcome.ERROR).inc()
            # our key names another request at Stripe: resending can never succeed, it is a bug to fix
            log.error(
                "stripe refused our idempotency key: it was used with other parameters",
                extra={"stripe_idempotency_key": idempotency_key, "stripe_request_id": exc.request_id},
            )
            raise PaymentKeyConflict(
                "the payment provider refused this purchase; it was logged for us to fix."
                " Start a new purchase with a new Idempotency-Key"
            ) from exc
        except stripe.StripeError as exc:
            STRIPE_REQUESTS.labels(_CREATE_INTENT, StripeOutcome.ERROR).inc()
            # the message may echo request data; the code and request id are enough to trace it
            log.warning(
                "stripe create_payment_intent failed",
                extra={"stripe_code": exc.code, "http_status": exc.http_status},
            )
            raise PaymentProviderError(
                "Stripe did not create the payment intent; retry with the same Idempotency-Key"
            ) from exc
        STRIPE_REQUESTS.labels(_CREATE_INTENT, StripeOutcome.OK).inc()
        return PaymentIntent(
            id=intent.id,
            client_secret=intent.client_secret or "",
            status=intent.status,
            amount=intent.amount,
            currency=intent.currency,
        )

    async def refund_payment(self, *, intent_id: str, idempotency_key: str) -> str:
        """Refund a payment in full; the same key answers with the same refund, so it happens once.

        Raises stripe.StripeError (the caller's attempt fails and is retried with the same key).
        """
        client = self.require()
        try:
            refund = await client.v1.refunds.create_async(
                {"payment_intent": intent_id}, {"idempotency_key": idempotency_key}
            )
        except stripe.StripeError as exc:
            STRIPE_REQUESTS.labels(_REFUND, StripeOutcome.ERROR).inc()
            log.warning(
                "stripe refund failed", extra={"stripe_code": exc.code, "http_status": exc.http_status}
            )
            raise
        STRIPE_REQUESTS.labels(_REFUND, StripeOutcome.OK).inc()
        return str(refund.id)

    async def list_events(
        self, *, created_gte: int, types: Sequence[str], page_size: int
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Stripe's events created at or after `created_gte` (Unix seconds) of these types, newest
        first as Stripe lists them, in pages of at most `page_size` (the SDK's auto-paging)."""
        client = self.require()
        params: Any = {"created": {"gte": created_gte}, "types": list(types), "limit": page_size}
        page: list[dict[str, Any]] = []
        try:
            listing = await client.v1.events.list_async(params)
            async for event in listing.auto_paging_iter():
                page.append(event.to_dict())
                if len(page) == page_size:
                    yield page
                    page = []
        except stripe.StripeError as exc:
            raise self._failed(_LIST_EVENTS, exc, "Stripe did not list its events") from exc
        STRIPE_REQUESTS.labels(_LIST_EVENTS, StripeOutcome.OK).inc()
        if page:
            yield page

    async def retrieve_payment_intent(self, intent_id: str) -> dict[str, Any]:
        """The PaymentIntent as Stripe has it now."""
        client = self.require()
        try:
            intent = await client.v1.payment_intents.retrieve_async(intent_id)
        except stripe.StripeError as exc:
            raise self._failed(_RETRIEVE_INTENT, exc, f"Stripe did not return intent {intent_id}") from exc
        STRIPE_REQUESTS.labels(_RETRIEVE_INTENT, StripeOutcome.OK).inc()
        result: dict[str, Any] = intent.to_dict()
        return result

    @staticmethod
    def _failed(operation: str, exc: stripe.StripeError, detail: str) -> PaymentProviderError:
        STRIPE_REQUESTS.labels(operation, StripeOutcome.ERROR).inc()
        # the message may echo request data; the code and HTTP status are enough to trace it
        log.warning(
            f"stripe {operation} failed", extra={"stripe_code": exc.code, "http_status": exc.http_status}
        )
        return PaymentProviderError(f"{detail} (HTTP status {exc.http_status}, code {exc.code})")
