from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from app.context import Caller
from app.http import Cursor, Limit, RowId
from app.idempotency.http import IdempotencyKeyHeader, keyed, respond
from app.leads import service
from app.leads.schemas import LeadCreate, LeadCreated, LeadPage, LeadPurchaseOut, PurchasedLeadPage
from app.services import Services


# digits only: int() would also take "+2", " 2", "2_0" or non-ASCII digits, giving one lead many URLs
class LeadsController(Controller):
    path = "/v1/leads"
    tags = ["leads"]

    @get("/")
    async def available(
        self,
        services: NamedDependency[Services],
        caller: NamedDependency[Caller],
        cursor: Cursor = None,
        limit: Limit = 50,
    ) -> LeadPage:
        return await service.list_available_leads(services, cursor, limit)

    @get("/purchased")
    async def purchased(
        self,
        services: NamedDependency[Services],
        caller: NamedDependency[Caller],
        cursor: Cursor = None,
        limit: Limit = 50,
    ) -> PurchasedLeadPage:
        return await service.list_purchased_leads(services, caller.user_id, cursor, limit)

    @post("/{lead_id:str}/purchase", status_code=201, summary="Buy a lead with credits")
    async def purchase(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        caller: NamedDependency[Caller],
        lead_id: RowId,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[LeadPurchaseOut]:
        req = keyed(request, caller, idempotency_key)
        return respond(await service.purchase_lead(services, caller, req, int(lead_id)))


class LeadsAdminController(Controller):
    path = "/admin/leads"
    tags = ["admin"]

    @post("/", status_code=201)
    async def create(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        admin: NamedDependency[Caller],
        data: JSONBody[LeadCreate],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[LeadCreated]:
        req = keyed(request, admin, idempotency_key, data)
        result = await service.create_lead(
            services, req, title=data.title, price_credits=data.price_credits, details=data.details
        )
        return respond(result)
