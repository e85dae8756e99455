from sqlalchemy import text

from app.services import Services


async def database_ready(services: Services) -> bool:
    """One round trip; any failure means not ready."""
    try:
        async with services.sessions() as session:
            return bool(await session.scalar(text("SELECT 1")) == 1)
    except Exception:
        return False
