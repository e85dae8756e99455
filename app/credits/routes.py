from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from app.context import Caller
from app.credits import service
from app.credits.schemas import (
    Balance,
    GrantOut,
    GrantRequest,
    LedgerPage,
    Package,
    PurchaseOut,
    PurchaseRequest,
    PurchaseState,
)
from app.http import Cursor, Limit, RowId
from app.idempotency.http import IdempotencyKeyHeader, keyed, respond
from app.services import Services


class CreditsController(Controller):
    path = "/v1/credits"
    tags = ["credits"]

    @get("/packages")
    async def packages(
        self, services: NamedDependency[Services], caller: NamedDependency[Caller]
    ) -> list[Package]:
        return service.list_packages(services)

    @post("/purchases", status_code=201, summary="Buy a credit package (creates a Stripe PaymentIntent)")
    async def purchase(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        caller: NamedDependency[Caller],
        data: JSONBody[PurchaseRequest],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[PurchaseOut]:
        req = keyed(request, caller, idempotency_key, data)
        return respond(await service.purchase_credits(services, caller, req, data.package_id))

    @get("/purchases/{purchase_id:str}", summary="A purchase's status, to poll after paying")
    async def purchase_state(
        self, services: NamedDependency[Services], caller: NamedDependency[Caller], purchase_id: RowId
    ) -> PurchaseState:
        return await service.get_purchase(services, caller, int(purchase_id))

    @get("/balance")
    async def balance(self, services: NamedDependency[Services], caller: NamedDependency[Caller]) -> Balance:
        return Balance(caller.user_id, await service.get_balance(services, caller.user_id))

    @get("/ledger")
    async def ledger(
        self,
        services: NamedDependency[Services],
        caller: NamedDependency[Caller],
        cursor: Cursor = None,
        limit: Limit = 50,
    ) -> LedgerPage:
        return await service.list_ledger(services, caller.user_id, cursor, limit)


class CreditsAdminController(Controller):
    path = "/admin/credits"
    tags = ["admin"]

    @post("/grants", status_code=201)
    async def grant(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        admin: NamedDependency[Caller],
        data: JSONBody[GrantRequest],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[GrantOut]:
        req = keyed(request, admin, idempotency_key, data)
        result = await service.grant_credits(
            services, req, user_id=data.user_id, credits=data.credits, reason=data.reason
        )
        return respond(result)
