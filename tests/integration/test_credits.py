"""Credits: packages, grants, balance, ledger, and the exactly-once grant of a paid package."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.fixtures.app import ADMIN, Client, auth, grant


async def test_packages_come_from_settings(make_client) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(
        credit_packages=[{"id": "tiny", "credits": 5, "amount": 99, "currency": "eur"}]
    )
    r = await client.get("/v1/credits/packages", headers=auth("u1"))
    assert r.json() == [{"id": "tiny", "credits": 5, "amount": 99, "currency": "eur"}]


async def test_unknown_package_is_404_and_creates_nothing(client: Client, db: asyncpg.Connection) -> None:
    r = await client.post("/v1/credits/purchases", json={"package_id": "nope"}, headers=auth("u1", key="k"))
    assert r.status_code == 404
    assert await db.fetchval("SELECT count(*) FROM credit_purchases") == 0


async def test_grant_balance_and_ledger_pages(client: Client) -> None:
    assert (await client.get("/v1/credits/balance", headers=auth("u1"))).json() == {
        "user_id": "u1",
        "balance": 0,
    }
    for i in range(5):
        await grant(client, "u1", 10 + i)
    balance = (await client.get("/v1/credits/balance", headers=auth("u1"))).json()["balance"]
    assert balance == 10 + 11 + 12 + 13 + 14

    first = (await client.get("/v1/credits/ledger?limit=2", headers=auth("u1"))).json()
    assert [e["delta"] for e in first["items"]] == [14, 13]
    second = (
        await client.get(f"/v1/credits/ledger?limit=2&cursor={first['next_cursor']}", headers=auth("u1"))
    ).json()
    assert [e["delta"] for e in second["items"]] == [12, 11]
    third = (
        await client.get(f"/v1/credits/ledger?limit=2&cursor={second['next_cursor']}", headers=auth("u1"))
    ).json()
    assert [e["delta"] for e in third["items"]] == [10]
    assert third["next_cursor"] is None
    other = (await client.get("/v1/credits/ledger", headers=auth("u2"))).json()
    assert other["items"] == []


async def test_grant_is_idempotent(client: Client, db: asyncpg.Connection) -> None:
    body = {"user_id": "u1", "credits": 50, "reason": "goodwill"}
    headers = auth(ADMIN, admin=True, key="grant-once")
    responses = await asyncio.gather(
        *(client.post("/admin/credits/grants", json=body, headers=headers) for _ in range(20))
    )
    assert {r.status_code for r in responses} <= {201, 409}
    assert await db.fetchval("SELECT balance FROM credit_accounts WHERE user_id = 'u1'") == 50
    assert await db.fetchval("SELECT count(*) FROM credit_ledger") == 1


async def test_balance_can_never_go_negative_even_in_sql(db: asyncpg.Connection) -> None:
    await db.execute("INSERT INTO credit_accounts (user_id, balance) VALUES ('u1', 5)")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE credit_accounts SET balance = balance - 6 WHERE user_id = 'u1'")
    await db.execute(
        "INSERT INTO credit_ledger (user_id, delta, balance_after, reason, reference)"
        " VALUES ('u1', 5, 5, 'x', 'ref-1')"
    )
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(
            "INSERT INTO credit_ledger (user_id, delta, balance_after, reason, reference)"
            " VALUES ('u1', 5, 10, 'x', 'ref-1')"
        )
