"""Outbox emails through the worker to a real SMTP server (aiosmtpd): delivered, retried, dead, retried by hand."""

from __future__ import annotations

import asyncpg

from app.failures.models import FailureStatus, OperationKind
from app.notifications.models import EmailStatus
from tests.fixtures.app import ADMIN, AppFactory, auth
from tests.fixtures.emails import buy_lead, smtp_settings
from tests.fixtures.smtp import SmtpServer
from tests.fixtures.worker import FAST_WORKER, running_worker, until, until_settled


async def test_a_lead_purchase_email_reaches_the_smtp_server(
    make_client: AppFactory, db: asyncpg.Connection, smtp: SmtpServer
) -> None:
    client = await make_client(**smtp_settings(smtp))
    await buy_lead(client)
    async with running_worker(client):
        await until_settled(db)
    assert [m.rcpt_tos for m in smtp.received] == [["u1@example.com"]]
    message = smtp.received[0].message
    assert "roofing, Austin" in message.get_content()
    public_id = await db.fetchval("SELECT public_id FROM outbox_emails")
    assert str(public_id) in message["Message-ID"]
    assert await db.fetchval("SELECT status FROM outbox_emails") == EmailStatus.SENT


async def test_a_refusing_server_is_retried_on_the_backoff_and_delivers_once_back(
    make_client: AppFactory, db: asyncpg.Connection, smtp: SmtpServer
) -> None:
    client = await make_client(**smtp_settings(smtp))
    smtp.refuse("451 4.3.0 try again later")
    await buy_lead(client)
    async with running_worker(client):
        await until(db, "SELECT attempts >= 2 FROM failed_operations")
        assert smtp.received == []
        smtp.reset()  # accepting again
        await until_settled(db)
    assert len(smtp.received) == 1
    op = await db.fetchrow("SELECT kind, status, attempts, history FROM failed_operations")
    assert (op["kind"], op["status"]) == (OperationKind.EMAIL, FailureStatus.SUCCEEDED)
    assert await db.fetchval("SELECT status FROM outbox_emails") == EmailStatus.SENT


async def test_smtp_down_for_good_is_dead_after_three_retries_then_a_manual_retry_delivers_once(
    make_client: AppFactory, db: asyncpg.Connection, smtp: SmtpServer
) -> None:
    client = await make_client(**smtp_settings(smtp, smtp_timeout_s=2.0))
    smtp.stop()
    try:
        await buy_lead(client)
        async with running_worker(client):
            await until_settled(db)
    finally:
        smtp.start()
    admin = auth(ADMIN, admin=True)
    listed = (await client.get("/admin/failed-operations?status=dead&kind=email", headers=admin)).json()
    assert len(listed["items"]) == 1
    op = listed["items"][0]
    assert (op["status"], op["attempts"], op["max_attempts"]) == ("dead", 4, 4)  # the first try and 3 retries
    detail = (await client.get(f"/admin/failed-operations/{op['id']}", headers=admin)).json()
    assert [h["attempt"] for h in detail["history"]] == [1, 2, 3, 4]
    assert all(h["error"] for h in detail["history"])
    assert await db.fetchval("SELECT status FROM outbox_emails") == EmailStatus.DEAD
    assert smtp.received == []

    async with running_worker(client):
        r = await client.post(f"/admin/failed-operations/{op['id']}/retry", headers=admin)
        assert r.status_code == 202, r.text
        await until_settled(db)
        await until(db, "SELECT status = 'succeeded' FROM failed_operations")
    assert len(smtp.received) == 1
    assert await db.fetchval("SELECT status FROM outbox_emails") == EmailStatus.SENT
    assert (
        await client.post(f"/admin/failed-operations/{op['id']}/discard", headers=admin)
    ).status_code == 409


async def test_without_smtp_emails_are_held_and_go_out_once_it_is_configured(
    make_client: AppFactory, db: asyncpg.Connection, smtp: SmtpServer
) -> None:
    unconfigured = await make_client(**FAST_WORKER)
    await buy_lead(unconfigured)
    async with running_worker(unconfigured):
        await until(db, "SELECT status = 'held' FROM outbox_emails")
    assert smtp.received == []
    configured = await make_client(**smtp_settings(smtp))
    async with running_worker(configured):
        await until(db, "SELECT status = 'sent' FROM outbox_emails")
    assert len(smtp.received) == 1


async def test_discarding_a_failed_email_marks_it_dead(
    make_client: AppFactory, db: asyncpg.Connection, smtp: SmtpServer
) -> None:
    client = await make_client(**smtp_settings(smtp, retry_base_delay_s=60.0, retry_max_delay_s=60.0))
    smtp.refuse("451 4.3.0 try again later")
    await buy_lead(client)
    async with running_worker(client):
        await until(db, "SELECT count(*) = 1 FROM failed_operations")
    op_id = await db.fetchval("SELECT id FROM failed_operations")
    r = await client.post(f"/admin/failed-operations/{op_id}/discard", headers=auth(ADMIN, admin=True))
    assert r.status_code == 200 and r.json()["status"] == FailureStatus.DISCARDED
    assert await db.fetchval("SELECT status FROM outbox_emails") == EmailStatus.DEAD
    assert (
        await client.get("/admin/failed-operations/999999", headers=auth(ADMIN, admin=True))
    ).status_code == 404
    assert (await client.get("/admin/failed-operations", headers=auth("u1"))).status_code == 403
