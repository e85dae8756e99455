"""Credit use cases: buy a package, read the balance and ledger, grant, and move credits.

Every balance change goes through `apply_ledger_entry`: the balance moves in SQL
(`balance - :p WHERE balance >= :p`), a CHECK keeps it non-negative, and the
ledger's unique `reference` lets each source event apply once only.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.context import Caller
from app.credits.models import CreditAccount, CreditPurchase, LedgerEntry, PurchaseStatus
from app.credits.schemas import GrantOut, LedgerItem, LedgerPage, Package, PurchaseOut
from app.idempotency import service as keys
from app.idempotency.service import Finish, Key, KeyedRequest, MoveTo, Phases, RecoveryPoint, Result, step
from app.observability.metrics import (
    CREDITS_GRANTED,
    PURCHASES,
    CreditReason,
    PurchaseKind,
    PurchaseOutcome,
)
from app.pagination import page, parse_cursor
from app.problems import NotFound, PaymentKeyConflict, ServiceError
from app.ratelimit import service as ratelimit
from app.ratelimit.service import RateAction
from app.services import Services

log = logging.getLogger("payguard.credits")


class InsufficientCredits(ServiceError):
    status, type, title = 402, "insufficient-credits", "Not enough credits"


class PaymentMismatch(ServiceError):
    status, type, title = 409, "payment-mismatch", "Payment does not match the purchase"


def list_packages(services: Services) -> list[Package]:
    return [Package(p.id, p.credits, p.amount, p.currency) for p in services.settings.credit_packages]


# prebuilt SQL on the hot path (docs/performance.md); the CHECK (balance >= 0) stands behind _DEBIT
_CREDIT = text(
    "INSERT INTO credit_accounts AS a (user_id, balance) VALUES (:user_id, :delta)"
    " ON CONFLICT (user_id) DO UPDATE SET balance = a.balance + :delta, updated_at = now()"
    " RETURNING balance"
)
_DEBIT = text(
    "UPDATE credit_accounts SET balance = balance - :cost, updated_at = now()"
    " WHERE user_id = :user_id AND balance >= :cost RETURNING balance"
)
_LEDGER = text(
    "INSERT INTO credit_ledger (user_id, delta, balance_after, reason, reference)"
    " VALUES (:user_id, :delta, :balance_after, :reason, :reference) RETURNING id"
)


async def apply_ledger_entry(
    session: AsyncSession | AsyncConnection, *, user_id: str, delta: int, reason: str, reference: str
) -> tuple[int, int]:
    """Move `delta` credits inside the caller's transaction; returns (entry id, new balance).

    Raises InsufficientCredits rather than let a balance go negative.
    """
    if delta > 0:
        balance = await session.scalar(_CREDIT, {"user_id": user_id, "delta": delta})
    else:
        balance = await session.scalar(_DEBIT, {"user_id": user_id, "cost": -delta})
    if balance is None:
        raise InsufficientCredits(f"this costs {-delta} credits, more than the balance")
    entry_id = await session.scalar(
        _LEDGER,
        {
            "user_id": user_id,
            "delta": delta,
            "balance_after": balance,
            "reason": reason,
            "reference": reference,
        },
    )
    assert entry_id is not None
    return entry_id, balance


async def purchase_credits(
    services: Services, caller: Caller, request: KeyedRequest, package_id: str
) -> Result:
    """Buy a credit package: creates exactly one PaymentIntent per Idempotency-Key.

    Phases: `started` records the purchase with a random Stripe idempotency key;
    `purchase_created` asks Stripe for the intent with that key and stores it. A
    crash between the Stripe call and our commit resumes at `purchase_created`,
    and Stripe answers the repeated call with the same intent.
    """
    keys.check_key(request.key, required=True)
    services.payments.require()
    if services.settings.package(package_id) is None:
        raise NotFound(f"no credit package {package_id!r}", package_id=package_id)
    try:
        result = await keys.run(services, request, {"package_id": package_id}, PURCHASE_PHASES)
    except ServiceError as exc:
        if exc.status >= 500:
            PURCHASES.labels(PurchaseKind.CREDITS, PurchaseOutcome.FAILED).inc()
        raise
    if not result.replayed:
        outcome = PurchaseOutcome.CREATED if result.status < 400 else PurchaseOutcome.FAILED
        PURCHASES.labels(PurchaseKind.CREDITS, outcome).inc()
    return result


async def _record_purchase(services: Services, key: Key) -> MoveTo | Finish:
    """started: the purchase row, with the Stripe key every later call for it will carry."""
    settings = services.settings
    package = settings.package(key.params["package_id"])
    if package is None:  # removed from the settings since the request was accepted
        raise NotFound(f"no credit package {key.params['package_id']!r}")
    await ratelimit.hit(
        services.sessions,
        RateAction.CREDIT_PURCHASE,
        key.user_id,
        settings.rate_credit_purchases,
        settings.rate_window_s,
    )
    async with step(services.sessions, key) as st:
        await st.conn.execute(
            insert(CreditPurchase).values(
                user_id=key.user_id,
                idempotency_key_id=key.id,
                package_id=package.id,
                credits=package.credits,
                amount=package.amount,
                currency=package.currency,
                status=PurchaseStatus.PENDING,
                stripe_idempotency_key=f"payguard-credit-purchase-{uuid.uuid4()}",
            )
        )
        return await st.move(RecoveryPoint.PURCHASE_CREATED)


async def _create_intent(services: Services, key: Key) -> MoveTo | Finish:
    """purchase_created: one PaymentIntent at Stripe, whatever happened to earlier attempts."""
    async with services.sessions() as session:
        purchase = await session.scalar(
            select(CreditPurchase).where(CreditPurchase.idempotency_key_id == key.id)
        )
    assert purchase is not None
    body: PurchaseOut | dict[str, Any]
    try:
        intent = await services.payments.create_payment_intent(
            amount=purchase.amount,
            currency=purchase.currency,
            metadata={"payguard_credit_purchase_id": str(purchase.id), "payguard_user_id": purchase.user_id},
            idempotency_key=purchase.stripe_idempotency_key,
        )
    except PaymentKeyConflict as exc:
        # final: a retry would get the same refusal from Stripe, so the answer is stored
        change: dict[str, Any] = {"status": PurchaseStatus.FAILED}
        status, body = exc.status, exc.problem()
    else:
        change = {"payment_intent_id": intent.id}
        status, body = (
            201,
            PurchaseOut(
                purchase_id=purchase.id,
                payment_intent_id=intent.id,
                client_secret=intent.client_secret,
                status=purchase.status,
                credits=purchase.credits,
                amount=purchase.amount,
                currency=purchase.currency,
            ),
        )
    async with step(services.sessions, key) as st:
        await st.conn.execute(
            update(CreditPurchase)
            .where(CreditPurchase.id == purchase.id)
            .values(**change, updated_at=func.now())
        )
        return await st.finish(status, body)


# public for the completer of abandoned keys (the cleanup job)
PURCHASE_PHASES: Phases = {
    RecoveryPoint.STARTED: _record_purchase,
    RecoveryPoint.PURCHASE_CREATED: _create_intent,
}


@dataclass(frozen=True)
class PaymentGrant:
    purchase_id: int
    user_id: str
    credits: int
    balance: int
    newly_granted: bool


async def grant_purchased_credits(
    services: Services, *, payment_intent_id: str, amount: int, currency: str
) -> PaymentGrant:
    """Grant a paid package's credits: exactly once per payment intent, whatever the retries.

    The purchase is found by the intent id (never by metadata alone) and locked;
    amount and currency must match what was charged.
    """
    async with services.sessions() as session, session.begin():
        purchase = await session.scalar(
            select(CreditPurchase)
            .where(CreditPurchase.payment_intent_id == payment_intent_id)
            .with_for_update()
        )
        if purchase is None:
            raise NotFound(f"no credit purchase for payment intent {payment_intent_id}")
        if (purchase.amount, purchase.currency) != (amount, currency.lower()):
            PURCHASES.labels(PurchaseKind.CREDITS, PurchaseOutcome.MISMATCH).inc()
            raise PaymentMismatch(
                f"intent paid {amount} {currency}, purchase expects {purchase.amount} {purchase.currency}"
            )
        if purchase.status == PurchaseStatus.SUCCEEDED:
            balance = await session.scalar(
                select(CreditAccount.balance).where(CreditAccount.user_id == purchase.user_id)
            )
            return PaymentGrant(purchase.id, purchase.user_id, purchase.credits, balance or 0, False)
        _, balance = await apply_ledger_entry(
            session,
            user_id=purchase.user_id,
            delta=purchase.credits,
            reason=f"purchase of package {purchase.package_id}",
            reference=f"payment_intent:{payment_intent_id}",
        )
        purchase.status = PurchaseStatus.SUCCEEDED
        purchase.updated_at = func.now()
    PURCHASES.labels(PurchaseKind.CREDITS, PurchaseOutcome.SUCCEEDED).inc()
    CREDITS_GRANTED.labels(CreditReason.PURCHASE).inc(purchase.credits)
    return PaymentGrant(purchase.id, purchase.user_id, purchase.credits, balance, True)


async def grant_credits(
    services: Services, request: KeyedRequest, *, user_id: str, credits: int, reason: str
) -> Result:
    """Admin grant: one ledger entry per Idempotency-Key."""
    keys.check_key(request.key, required=True)
    params = {"user_id": user_id, "credits": credits, "reason": reason}
    result = await keys.run(services, request, params, {RecoveryPoint.STARTED: _grant})
    if not result.replayed:
        CREDITS_GRANTED.labels(CreditReason.ADMIN).inc(credits)
    return result


async def _grant(services: Services, key: Key) -> Finish:
    async with step(services.sessions, key) as st:
        entry_id, balance = await apply_ledger_entry(
            st.conn,
            user_id=key.params["user_id"],
            delta=key.params["credits"],
            reason=key.params["reason"],
            reference=f"grant:{key.id}",
        )
        return await st.finish(201, GrantOut(entry_id, balance))


async def get_balance(services: Services, user_id: str) -> int:
    async with services.sessions() as session:
        balance = await session.scalar(select(CreditAccount.balance).where(CreditAccount.user_id == user_id))
    return balance or 0


async def list_ledger(services: Services, user_id: str, cursor: str | None, limit: int) -> LedgerPage:
    """Newest first."""
    before = parse_cursor(cursor)
    query = select(LedgerEntry).where(LedgerEntry.user_id == user_id)
    if before is not None:
        query = query.where(LedgerEntry.id < before)
    async with services.sessions() as session:
        rows = (await session.scalars(query.order_by(LedgerEntry.id.desc()).limit(limit + 1))).all()
    items, next_cursor = page(rows, limit)
    return LedgerPage(
        items=[LedgerItem(e.id, e.delta, e.reason, e.reference, e.created_at) for e in items],
        next_cursor=next_cursor,
    )
