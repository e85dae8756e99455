"""The one place that says what the worker runs: each queue's tasks and each failed operation's retry."""

from __future__ import annotations

from collections.abc import Mapping

from app.credits.tasks import ShortfallRecovery
from app.failures.models import OperationKind
from app.failures.service import Operation
from app.notifications.tasks import EmailSending
from app.webhooks.tasks import EventHandling

OPERATIONS: Mapping[str, Operation] = {
    OperationKind.WEBHOOK: EventHandling(),
    OperationKind.EMAIL: EmailSending(),
    OperationKind.REFUND_SHORTFALL: ShortfallRecovery(),
}
