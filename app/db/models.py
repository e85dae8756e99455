"""Every domain's tables on one metadata, for Alembic and the tests."""

from app.credits import models as credits
from app.db.base import Base
from app.errors import models as errors
from app.failures import models as failures
from app.idempotency import models as idempotency
from app.jobs import models as jobs
from app.leads import models as leads
from app.notifications import models as notifications
from app.ratelimit import models as ratelimit
from app.reservations import models as reservations
from app.webhooks import models as webhooks

metadata = Base.metadata
__all__ = [
    "credits",
    "errors",
    "failures",
    "idempotency",
    "jobs",
    "leads",
    "metadata",
    "notifications",
    "ratelimit",
    "reservations",
    "webhooks",
]
