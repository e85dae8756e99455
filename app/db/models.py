"""Every domain's tables on one metadata, for Alembic and the tests."""

from app.credits import models as credits
from app.db.base import Base
from app.idempotency import models as idempotency
from app.leads import models as leads
from app.notifications import models as notifications
from app.ratelimit import models as ratelimit

metadata = Base.metadata
__all__ = ["credits", "idempotency", "leads", "metadata", "notifications", "ratelimit"]
