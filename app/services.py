"""What every use case is handed: settings, the session factory and the gateways to the outside.

Built once by `create_app` (or a worker); domains import it, the HTTP shell does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.config import Settings
from app.payments.gateway import PaymentGateway


@dataclass(frozen=True)
class Services:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    payments: PaymentGateway
    # what a retry of each kind of failed operation does (app/worker/registry.py)
    # (an app.failures.service.Operation each; typed loosely: Litestar resolves these hints at runtime)
    operations: Mapping[str, Any] = field(default_factory=dict)

    @property
    def engine(self) -> AsyncEngine:
        """The sessions' engine: for work that needs a connection and no ORM session (the worker's)."""
        engine: AsyncEngine = self.sessions.kw["bind"]
        return engine
