from typing import Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from app.context import Caller
from app.http import RowId
from app.idempotency.http import IdempotencyKeyHeader, keyed, respond
from app.reservations import service
from app.reservations.schemas import (
    Cancelled,
    CheckoutOut,
    HoldCreate,
    ReservationOut,
    ReservationStats,
    TicketTypeCreate,
    TicketTypeCreated,
    TicketTypeOut,
)
from app.services import Services


class TicketTypesController(Controller):
    path = "/v1/ticket-types"
    tags = ["reservations"]

    @get("/{type_id:str}")
    async def show(
        self, services: NamedDependency[Services], caller: NamedDependency[Caller], type_id: RowId
    ) -> TicketTypeOut:
        return await service.get_ticket_type(services, int(type_id))


class ReservationsController(Controller):
    path = "/v1/reservations"
    tags = ["reservations"]

    @post("/", status_code=201, summary="Hold tickets for PAYGUARD_RESERVATION_TTL_S")
    async def hold(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        caller: NamedDependency[Caller],
        data: JSONBody[HoldCreate],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[ReservationOut]:
        req = keyed(request, caller, idempotency_key, data)
        result = await service.hold_tickets(
            services, caller, req, ticket_type_id=data.ticket_type_id, quantity=data.quantity
        )
        return respond(result)

    @get("/{reservation_id:str}")
    async def show(
        self, services: NamedDependency[Services], caller: NamedDependency[Caller], reservation_id: RowId
    ) -> ReservationOut:
        return await service.get_reservation(services, caller, int(reservation_id))

    @post("/{reservation_id:str}/checkout", status_code=201, summary="Pay for a hold")
    async def checkout(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        caller: NamedDependency[Caller],
        reservation_id: RowId,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[CheckoutOut]:
        req = keyed(request, caller, idempotency_key)
        return respond(await service.checkout_reservation(services, caller, req, int(reservation_id)))

    @delete("/{reservation_id:str}", status_code=200, summary="Release a hold at once")
    async def cancel(
        self, services: NamedDependency[Services], caller: NamedDependency[Caller], reservation_id: RowId
    ) -> Cancelled:
        return await service.cancel_reservation(services, caller, int(reservation_id))


class ReservationsAdminController(Controller):
    path = "/admin"
    tags = ["admin"]

    @post("/ticket-types", status_code=201)
    async def create_ticket_type(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        admin: NamedDependency[Caller],
        data: JSONBody[TicketTypeCreate],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[TicketTypeCreated]:
        req = keyed(request, admin, idempotency_key, data)
        result = await service.create_ticket_type(
            services, req, name=data.name, capacity=data.capacity, price=data.price, currency=data.currency
        )
        return respond(result)

    @get("/reservations/stats")
    async def stats(
        self, services: NamedDependency[Services], admin: NamedDependency[Caller]
    ) -> ReservationStats:
        return await service.reservation_stats(services)
