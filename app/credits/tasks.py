"""What the worker does for credits: a retried refund shortfall takes back what the balance now holds."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from app.credits import service
from app.failures.engine import RetryLater
from app.services import Services
from app.worker.leases import Commit


class ShortfallRecovery:
    """Refunded credits the user had already spent: each retry takes back as much as the balance allows."""

    async def perform(self, services: Services, item_id: int | None, payload: dict[str, Any]) -> Commit:
        async def commit(conn: AsyncConnection) -> str:
            taken = await service.take_back_shortfall(
                conn,
                user_id=payload["user_id"],
                credits=payload["credits"],
                reference=f"refund_shortfall:{payload['purchase_id']}:{payload['credits']}",
            )
            if not taken:
                raise RetryLater(f"the balance does not hold the {payload['credits']} credits owed yet")
            return "recovered"

        return commit

    async def give_up(self, conn: AsyncConnection, item_id: int | None) -> None:
        """Nothing to mark: the purchase already records the refund."""
