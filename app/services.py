"""What every use case is handed: settings, the session factory and the gateways to the outside.

Built once by `create_app` (or a worker); domains import it, the HTTP shell does not.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.payments.gateway import PaymentGateway


@dataclass(frozen=True)
class Services:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    payments: PaymentGateway
