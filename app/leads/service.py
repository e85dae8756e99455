"""Lead use cases. A purchase is one transaction: lock the lead, debit, mark sold, ledger, outbox."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select, text

from app.context import Caller
from app.credits import service as credits
from app.idempotency import service as keys
from app.idempotency.service import Finish, Key, KeyedRequest, RecoveryPoint, Result, step
from app.leads.models import Lead, LeadPurchase, LeadStatus
from app.leads.schemas import (
    LeadCreated,
    LeadItem,
    LeadPage,
    LeadPurchaseOut,
    PurchasedLead,
    PurchasedLeadPage,
)
from app.notifications import service as notifications
from app.observability.metrics import PURCHASES, PurchaseKind, PurchaseOutcome
from app.pagination import page, parse_cursor
from app.problems import NotFound, ServiceError
from app.ratelimit import service as ratelimit
from app.ratelimit.service import RateAction
from app.services import Services


class LeadUnavailable(ServiceError):
    status, type, title = 409, "lead-unavailable", "Lead is no longer available"


# prebuilt SQL on the hot path (docs/performance.md)
_LOCK_LEAD = text("SELECT price_credits, status, title FROM leads WHERE id = :lead_id FOR UPDATE")
_SELL_LEAD = text(
    "UPDATE leads SET status = :sold, buyer_id = :buyer_id, sold_at = now() WHERE id = :lead_id"
)
_RECORD_SALE = text(
    "INSERT INTO lead_purchases (lead_id, user_id, price_credits, ledger_entry_id)"
    " VALUES (:lead_id, :user_id, :price_credits, :ledger_entry_id) RETURNING id"
)


async def create_lead(
    services: Services, request: KeyedRequest, *, title: str, price_credits: int, details: dict[str, Any]
) -> Result:
    keys.check_key(request.key, required=False)
    params = {"title": title, "price_credits": price_credits, "details": details}
    return await keys.run(services, request, params, {RecoveryPoint.STARTED: _insert_lead})


async def _insert_lead(services: Services, key: Key) -> Finish:
    async with step(services.sessions, key) as st:
        lead_id = await st.conn.scalar(
            insert(Lead)
            .values(
                title=key.params["title"],
                price_credits=key.params["price_credits"],
                details=key.params["details"],
                status=LeadStatus.AVAILABLE,
            )
            .returning(Lead.id)
        )
        assert lead_id is not None
        return await st.finish(201, LeadCreated(lead_id, LeadStatus.AVAILABLE))


async def purchase_lead(services: Services, caller: Caller, request: KeyedRequest, lead_id: int) -> Result:
    """Buy a lead with credits: an exclusive lead is sold once, a balance never goes negative.

    Lock order (key, lead, account) is the same in every use case, so racing
    buyers queue on the lead row instead of deadlocking.
    """
    keys.check_key(request.key, required=True)
    params = {"lead_id": lead_id, "recipient": caller.email}
    try:
        result = await keys.run(services, request, params, {RecoveryPoint.STARTED: _sell_lead})
    except ServiceError as exc:
        outcome = PurchaseOutcome.REJECTED if exc.status < 500 else PurchaseOutcome.FAILED
        PURCHASES.labels(PurchaseKind.LEAD, outcome).inc()
        raise
    if not result.replayed:
        PURCHASES.labels(PurchaseKind.LEAD, PurchaseOutcome.SUCCEEDED).inc()
    return result


async def _sell_lead(services: Services, key: Key) -> Finish:
    """started: lock the lead, debit, mark it sold, record the sale and its email, in one transaction."""
    settings = services.settings
    lead_id: int = key.params["lead_id"]
    await ratelimit.hit(
        services.sessions,
        RateAction.LEAD_PURCHASE,
        key.user_id,
        settings.rate_lead_purchases,
        settings.rate_window_s,
    )
    async with step(services.sessions, key) as st:
        conn = st.conn
        lead = (await conn.execute(_LOCK_LEAD, {"lead_id": lead_id})).first()
        if lead is None:
            raise NotFound(f"no lead {lead_id}")
        if lead.status != LeadStatus.AVAILABLE:
            raise LeadUnavailable(f"lead {lead_id} has been sold")
        entry_id, balance = await credits.apply_ledger_entry(
            conn,
            user_id=key.user_id,
            delta=-lead.price_credits,
            reason=f"purchase of lead {lead_id}",
            reference=f"lead_purchase:{lead_id}",
        )
        await conn.execute(_SELL_LEAD, {"lead_id": lead_id, "buyer_id": key.user_id, "sold": LeadStatus.SOLD})
        purchase_id = await conn.scalar(
            _RECORD_SALE,
            {
                "lead_id": lead_id,
                "user_id": key.user_id,
                "price_credits": lead.price_credits,
                "ledger_entry_id": entry_id,
            },
        )
        assert purchase_id is not None
        await notifications.enqueue_email(
            conn,
            notifications.Email(
                notifications.EmailKind.LEAD_PURCHASED,
                key.user_id,
                key.params["recipient"],
                {"lead_id": lead_id, "purchase_id": purchase_id, "title": lead.title},
            ),
        )
        out = LeadPurchaseOut(purchase_id, lead_id, lead.price_credits, balance)
        return await st.finish(201, out)


async def list_available_leads(services: Services, cursor: str | None, limit: int) -> LeadPage:
    after = parse_cursor(cursor)
    query = select(Lead).where(Lead.status == LeadStatus.AVAILABLE)
    if after is not None:
        query = query.where(Lead.id > after)
    async with services.sessions() as session:
        rows = (await session.scalars(query.order_by(Lead.id).limit(limit + 1))).all()
    items, next_cursor = page(rows, limit)
    return LeadPage([LeadItem(r.id, r.title, r.price_credits, r.status) for r in items], next_cursor)


async def list_purchased_leads(
    services: Services, user_id: str, cursor: str | None, limit: int
) -> PurchasedLeadPage:
    """The caller's purchases, newest first, with the details they paid for."""
    before = parse_cursor(cursor)
    query = (
        select(
            LeadPurchase.id,
            Lead.id.label("lead_id"),
            Lead.title,
            LeadPurchase.price_credits,
            Lead.details,
            LeadPurchase.created_at,
        )
        .join(Lead, Lead.id == LeadPurchase.lead_id)
        .where(LeadPurchase.user_id == user_id)
    )
    if before is not None:
        query = query.where(LeadPurchase.id < before)
    async with services.sessions() as session:
        rows = (await session.execute(query.order_by(LeadPurchase.id.desc()).limit(limit + 1))).all()
    items, next_cursor = page(rows, limit)
    return PurchasedLeadPage([PurchasedLead(*r) for r in items], next_cursor)
