"""What every use case is handed: settings, the session factory, the payment gateway."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.payments.service import PaymentGateway


@dataclass(frozen=True)
class Services:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    payments: PaymentGateway


@dataclass(frozen=True)
class Caller:
    """The authenticated caller, from the bearer token."""

    user_id: str
    role: str | None = None
    email: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"
