"""Migrations and models agree, and the history runs down and up again."""

from __future__ import annotations

import asyncio

from alembic import command

from app.db.migrate import alembic_config


async def test_models_match_migrations(db_url: str) -> None:
    # raises if autogenerate would find any difference between models and the migrated schema
    await asyncio.to_thread(command.check, alembic_config(db_url))


async def test_downgrade_to_base_and_upgrade_again(db_url: str) -> None:
    cfg = alembic_config(db_url)
    await asyncio.to_thread(command.downgrade, cfg, "base")
    await asyncio.to_thread(command.upgrade, cfg, "head")
    await asyncio.to_thread(command.check, cfg)
