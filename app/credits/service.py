"""Credit use cases: buy a package, read the balance and ledger, grant, and move credits.

Every balance change goes through `apply_ledger_entry`: the balance moves in SQL
(`balance - :p WHERE balance >= :p`), a CHECK keeps it non-negative, and the
ledger's unique `reference` lets each source event apply once only.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.context import Caller
from app.credits.models import CreditAccount, CreditPurchase, LedgerEntry, PurchaseStatus
from app.credits.schemas import GrantOut, LedgerItem, LedgerPage, Package, PurchaseOut, PurchaseState
from app.failures.engine import NeedsHuman
from app.idempotency import service as keys
from app.idempotency.service import Finish, Key, KeyedRequest, MoveTo, Phases, RecoveryPoint, Result, step
from app.notifications import service as notifications
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


PURCHASE_METADATA = "payguard_credit_purchase_id"  # on every intent we create; never trusted alone


class InsufficientCredits(ServiceError):
    status, type, title = 402, "insufficient-credits", "Not enough credits"


class PurchaseAbandoned(ServiceError):
    """What a retry of a purchase's key hears once the cleanup job abandoned the purchase."""

    status, type, title = 409, "purchase-abandoned", "Purchase abandoned"


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
        params = {"package_id": package_id, "recipient": caller.email}
        result = await keys.run(services, request, params, PURCHASE_PHASES)
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
                recipient=key.params.get("recipient"),
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
            metadata={PURCHASE_METADATA: str(purchase.id), "payguard_user_id": purchase.user_id},
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


class Settlement(StrEnum):
    """What a Stripe event did to a credit purchase (the webhook event's recorded outcome)."""

    GRANTED = "granted"
    MARKED_FAILED = "marked_failed"
    REVERSED = "reversed"  # a refund took credits back (all of them, or what the balance held)
    UNCHANGED = "unchanged"  # a duplicate, or older than the state the purchase is in
    NOT_OURS = "not_ours"  # no credit purchase has this intent
    # Stripe's amount or currency is not the purchase's: nothing granted, never recorded as an outcome
    # (settle_paid_intent raises NeedsHuman for it)
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class Paid:
    """What a payment_intent.succeeded says was paid."""

    intent_id: str
    amount: int
    currency: str


# the purchases' rows, locked (in id order: batches never deadlock on them): every event about one
# intent waits for the one before it
_PURCHASE_COLUMNS = (
    "id, user_id, package_id, credits, amount, currency, status, recipient, credits_reversed,"
    " payment_intent_id"
)
_LOCK_PURCHASE = text(
    f"SELECT {_PURCHASE_COLUMNS} FROM credit_purchases WHERE payment_intent_id = :intent_id FOR UPDATE"  # noqa: S608
)
_LOCK_PURCHASES = text(
    f"SELECT {_PURCHASE_COLUMNS} FROM credit_purchases"  # noqa: S608 (constants)
    " WHERE payment_intent_id = ANY(CAST(:intents AS text[])) ORDER BY id FOR UPDATE"
)
_SET_PURCHASE = text(
    "UPDATE credit_purchases SET status = :status, credits_reversed = :reversed, updated_at = now()"
    " WHERE id = :id"
)
_BALANCE = text("SELECT balance FROM credit_accounts WHERE user_id = :user_id FOR UPDATE")
# Several purchases granted in one statement: each account moves once by its purchases' sum (accounts
# locked in user order), each purchase gets its ledger entry with the balance as it was after it (the
# final balance less what the account's later purchases of the batch added), and each purchase succeeds.
_GRANT = text(
    "WITH g AS (SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:user_ids AS text[]),"
    " CAST(:credits AS bigint[]), CAST(:reasons AS text[]), CAST(:refs AS text[]))"
    " AS g(id, user_id, credits, reason, reference)),"
    " account AS (INSERT INTO credit_accounts AS a (user_id, balance)"
    " SELECT user_id, sum(credits) FROM g GROUP BY user_id ORDER BY user_id"
    " ON CONFLICT (user_id) DO UPDATE SET balance = a.balance + excluded.balance, updated_at = now()"
    " RETURNING a.user_id, a.balance),"
    " entry AS (INSERT INTO credit_ledger (user_id, delta, balance_after, reason, reference)"
    " SELECT g.user_id, g.credits, account.balance - coalesce(sum(g.credits) OVER later, 0),"
    " g.reason, g.reference FROM g JOIN account USING (user_id)"
    " WINDOW later AS (PARTITION BY g.user_id ORDER BY g.id DESC"
    " ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"
    " ORDER BY g.id RETURNING reference, balance_after),"
    " paid AS (UPDATE credit_purchases p SET status = :succeeded, credits_reversed = 0, updated_at = now()"
    " FROM g WHERE p.id = g.id)"
    " SELECT reference, balance_after FROM entry"
)


def _matches(purchase: Any, amount: int, currency: str) -> bool:
    return (purchase.amount, purchase.currency) == (amount, currency.lower())


def _check_paid(purchase: Any, amount: int, currency: str, *, counted: bool = False) -> None:
    if not _matches(purchase, amount, currency):
        if not counted:
            PURCHASES.labels(PurchaseKind.CREDITS, PurchaseOutcome.MISMATCH).inc()
        raise NeedsHuman(
            f"Stripe reports {amount} {currency} for purchase {purchase.id},"
            f" which expects {purchase.amount} {purchase.currency}: nothing was granted"
        )


async def _grant_paid(conn: AsyncConnection, purchases: Sequence[Any]) -> None:
    """Credit paid purchases (locked rows) and queue their receipts, in the caller's transaction."""
    references = [f"payment_intent:{p.payment_intent_id}" for p in purchases]
    params = {
        "ids": [p.id for p in purchases],
        "user_ids": [p.user_id for p in purchases],
        "credits": [p.credits for p in purchases],
        "reasons": [f"purchase of package {p.package_id}" for p in purchases],
        "refs": references,
        "succeeded": PurchaseStatus.SUCCEEDED,
    }
    balances = {row.reference: row.balance_after for row in await conn.execute(_GRANT, params)}
    PURCHASES.labels(PurchaseKind.CREDITS, PurchaseOutcome.SUCCEEDED).inc(len(purchases))
    CREDITS_GRANTED.labels(CreditReason.PURCHASE).inc(sum(p.credits for p in purchases))
    receipts = [
        notifications.Email(
            notifications.EmailKind.CREDITS_PURCHASED,
            p.user_id,
            p.recipient,
            {
                "purchase_id": p.id,
                "credits": p.credits,
                "amount": p.amount,
                "currency": p.currency,
                "balance": balances[reference],
            },
        )
        for p, reference in zip(purchases, references, strict=True)
    ]
    await notifications.enqueue_emails(conn, receipts)


async def settle_paid_intents(conn: AsyncConnection, paid: Sequence[Paid]) -> list[Settlement]:
    """payment_intent.succeeded about several intents: one statement locks their purchases, one grants.

    Credits are granted exactly once per intent, only if amount and currency match (MISMATCH
    otherwise, and nothing granted). A failed purchase can still succeed (the card was retried);
    a refunded one is never granted again.
    """
    rows = (await conn.execute(_LOCK_PURCHASES, {"intents": [p.intent_id for p in paid]})).all()
    purchases = {row.payment_intent_id: row for row in rows}
    granted: dict[str, Any] = {}
    settled: list[Settlement] = []
    for p in paid:
        purchase = purchases.get(p.intent_id)
        if purchase is None:
            settled.append(Settlement.NOT_OURS)
        elif not _matches(purchase, p.amount, p.currency):
            PURCHASES.labels(PurchaseKind.CREDITS, PurchaseOutcome.MISMATCH).inc()
            settled.append(Settlement.MISMATCH)
        elif purchase.status in (PurchaseStatus.SUCCEEDED, PurchaseStatus.REFUNDED) or p.intent_id in granted:
            settled.append(Settlement.UNCHANGED)
        else:
            granted[p.intent_id] = purchase
            settled.append(Settlement.GRANTED)
    if granted:
        await _grant_paid(conn, list(granted.values()))
    return settled


async def settle_paid_intent(
    conn: AsyncConnection, *, intent_id: str, amount: int, currency: str
) -> Settlement:
    """One payment_intent.succeeded (settle_paid_intents); a mismatch raises NeedsHuman."""
    settled = (await settle_paid_intents(conn, [Paid(intent_id, amount, currency)]))[0]
    if settled == Settlement.MISMATCH:  # say what the purchase expects (its row is locked already)
        purchase = (await conn.execute(_LOCK_PURCHASE, {"intent_id": intent_id})).one()
        _check_paid(purchase, amount, currency, counted=True)
    return settled


async def mark_payment_failed(conn: AsyncConnection, *, intent_id: str) -> Settlement:
    """payment_intent.payment_failed / .canceled: a pending purchase failed; any later state stands."""
    purchase = (await conn.execute(_LOCK_PURCHASE, {"intent_id": intent_id})).first()
    if purchase is None:
        return Settlement.NOT_OURS
    if purchase.status not in (PurchaseStatus.PENDING, PurchaseStatus.ABANDONED):
        return Settlement.UNCHANGED
    await conn.execute(
        _SET_PURCHASE,
        {"id": purchase.id, "status": PurchaseStatus.FAILED, "reversed": purchase.credits_reversed},
    )
    return Settlement.MARKED_FAILED


@dataclass(frozen=True)
class Shortfall:
    """Refunded credits the balance did not hold (already spent): a human decides."""

    user_id: str
    purchase_id: int
    credits: int


async def reverse_refund(
    conn: AsyncConnection, *, intent_id: str, amount: int, refunded: int, currency: str
) -> tuple[Settlement, Shortfall | None]:
    """charge.refunded: take back the refunded share of the credits, once per cumulative refund.

    `refunded` is the charge's amount_refunded so far: two events about the same refund take
    back nothing twice. The balance never goes negative: what it cannot give back is returned
    as a Shortfall. A purchase whose success was not handled yet is granted first (the charge
    proves the payment), so the late success event then changes nothing.
    """
    purchase = (await conn.execute(_LOCK_PURCHASE, {"intent_id": intent_id})).first()
    if purchase is None:
        return Settlement.NOT_OURS, None
    _check_paid(purchase, amount, currency)
    if purchase.status not in (PurchaseStatus.SUCCEEDED, PurchaseStatus.REFUNDED):
        await _grant_paid(conn, [purchase])
    target = purchase.credits * min(refunded, amount) // amount
    to_take = target - purchase.credits_reversed
    if to_take <= 0:
        return Settlement.UNCHANGED, None
    balance = await conn.scalar(_BALANCE, {"user_id": purchase.user_id}) or 0
    take = min(balance, to_take)
    if take:
        await apply_ledger_entry(
            conn,
            user_id=purchase.user_id,
            delta=-take,
            reason=f"refund of package {purchase.package_id}",
            reference=f"refund:{intent_id}:{refunded}",
        )
    status = PurchaseStatus.REFUNDED if refunded >= amount else PurchaseStatus.SUCCEEDED
    await conn.execute(_SET_PURCHASE, {"id": purchase.id, "status": status, "reversed": target})
    shortfall = Shortfall(purchase.user_id, purchase.id, to_take - take) if take < to_take else None
    return Settlement.REVERSED, shortfall


async def take_back_shortfall(conn: AsyncConnection, *, user_id: str, credits: int, reference: str) -> bool:
    """Take back what a refund could not, if the balance now holds all of it (never a negative balance)."""
    balance = await conn.scalar(_BALANCE, {"user_id": user_id}) or 0
    if balance < credits:
        return False
    await apply_ledger_entry(
        conn, user_id=user_id, delta=-credits, reason="refund shortfall", reference=reference
    )
    return True


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


async def get_purchase(services: Services, caller: Caller, purchase_id: int) -> PurchaseState:
    """The caller's own purchase; another user's is not found, as if it did not exist."""
    async with services.sessions() as session:
        p = await session.get(CreditPurchase, purchase_id)
    if p is None or p.user_id != caller.user_id:
        raise NotFound(f"no credit purchase {purchase_id}")
    return PurchaseState(
        p.id, p.payment_intent_id, p.status, p.credits, p.amount, p.currency, p.created_at, p.updated_at
    )


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


# pending purchases are found through their partial index (the status inlined so a generic plan can use it)
_DEAD_CANDIDATES = text(
    f"SELECT id, idempotency_key_id FROM credit_purchases WHERE status = '{PurchaseStatus.PENDING}'"  # noqa: S608
    " AND payment_intent_id IS NULL AND id > :after"
    " AND created_at < now() - make_interval(secs => :timeout) ORDER BY id LIMIT :limit"
)
_ABANDON = text(
    "UPDATE credit_purchases SET status = :abandoned, updated_at = now()"
    " WHERE idempotency_key_id = ANY(CAST(:keys AS bigint[])) AND status = :pending"
    " AND payment_intent_id IS NULL"
)


async def abandon_dead_purchases(services: Services, *, after: int, limit: int) -> tuple[int, int | None]:
    """One batch of purchases whose request died before an intent was recorded become `abandoned`.

    No money moved: without a recorded intent the client never got a client secret to pay with.
    Only a purchase whose key no request can run again is abandoned (idempotency's
    close_dead_requests: no live lock and no run within the lock timeout, or the key pruned). That
    key is taken over, its fencing token bumped, and `purchase-abandoned` stored as its answer, in
    this transaction and before the purchase row, the order the phases lock them in: a slow request
    that wakes commits nothing, and a retry with the key replays the answer instead of making an
    intent. Returns (how many were abandoned, the next batch's cursor or None after the last).
    """
    timeout_s = services.settings.idempotency_lock_timeout_s
    async with services.sessions() as session, session.begin():
        conn = await session.connection()
        params = {"after": after, "timeout": timeout_s, "limit": limit}
        rows = (await conn.execute(_DEAD_CANDIDATES, params)).all()
        if not rows:
            return 0, None
        answer = PurchaseAbandoned(
            "this purchase was abandoned before a payment was created: no money moved."
            " Start a new purchase with a new Idempotency-Key"
        )
        dead = await keys.close_dead_requests(conn, [r.idempotency_key_id for r in rows], timeout_s, answer)
        result = await conn.execute(
            _ABANDON,
            {"keys": list(dead), "abandoned": PurchaseStatus.ABANDONED, "pending": PurchaseStatus.PENDING},
        )
    return int(result.rowcount), (rows[-1].id if len(rows) == limit else None)


_PENDING_INTENTS = text(
    f"SELECT id, payment_intent_id FROM credit_purchases WHERE status = '{PurchaseStatus.PENDING}'"  # noqa: S608
    " AND payment_intent_id IS NOT NULL AND id > :after"
    " AND created_at < now() - make_interval(secs => :grace)"
    " AND created_at >= now() - make_interval(secs => :max_age) ORDER BY id LIMIT :limit"
)


async def pending_intents(
    services: Services, *, grace_s: float, max_age_s: int, after: int, limit: int
) -> list[tuple[int, str]]:
    """(purchase id, intent id) of purchases still pending, older than the grace and younger than
    the max age, after the purchase id `after` (reconciliation asks Stripe about each)."""
    params = {"grace": grace_s, "max_age": max_age_s, "after": after, "limit": limit}
    async with services.sessions() as session:
        rows = (await session.execute(_PENDING_INTENTS, params)).all()
    return [(row.id, row.payment_intent_id) for row in rows]


_OUTCOMES = text(
    "SELECT count(*) AS total, count(*) FILTER (WHERE status IN (:failed, :abandoned)) AS failed"
    " FROM credit_purchases WHERE created_at >= :start AND created_at < :end"
)


async def purchase_outcomes(conn: AsyncConnection, start: datetime, end: datetime) -> tuple[int, int]:
    """Credit purchases made in [start, end): how many, and how many failed or were abandoned since."""
    params = {
        "start": start,
        "end": end,
        "failed": PurchaseStatus.FAILED,
        "abandoned": PurchaseStatus.ABANDONED,
    }
    row = (await conn.execute(_OUTCOMES, params)).one()
    return row.total, row.failed
