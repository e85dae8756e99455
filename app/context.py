"""Who is calling: the authenticated caller every route hands its use case."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """The authenticated caller, from the bearer token."""

    user_id: str
    role: str | None = None
    email: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"
