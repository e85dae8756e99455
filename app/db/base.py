"""The declarative base every domain's models share (one metadata, one migration history)."""

from enum import StrEnum

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def one_of(column: str, enum: type[StrEnum]) -> str:
    """The CHECK text that keeps a status column within its enum's values."""
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in enum) + ")"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
