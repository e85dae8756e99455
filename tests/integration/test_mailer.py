"""Outbox emails composed and sent to a real SMTP server (aiosmtpd on loopback), failures classified."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID, uuid4

import pytest

from app.config import Settings, load_settings
from app.failures.engine import NeedsHuman, RetryLater
from app.notifications.mailer import compose, send
from app.notifications.service import EmailKind
from tests.fixtures.smtp import HOST, SmtpServer, silent_server

RECIPIENT = "buyer@example.com"
LEAD = {"lead_id": 7, "purchase_id": 41, "title": "Roof repair in Leeds"}
RECEIPT = {"purchase_id": 12, "credits": 500, "amount": 4_500, "currency": "usd", "balance": 1_600}


def settings_for(smtp: SmtpServer | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "smtp_host": HOST if smtp else None,
        "smtp_port": smtp.port if smtp else 587,
        "smtp_starttls": False,  # the test server speaks plain SMTP on loopback
        "smtp_timeout_s": 2.0,
        "mail_from": "payguard <receipts@payguard.example>",
    }
    values.update(overrides)
    return load_settings({}, **values)


def lead_email(settings: Settings, public_id: UUID | None = None, **payload: Any) -> Any:
    return compose(
        settings,
        kind=EmailKind.LEAD_PURCHASED,
        public_id=public_id or uuid4(),
        recipient=RECIPIENT,
        payload={**LEAD, **payload},
    )


async def test_a_lead_email_reaches_the_server_as_composed(smtp: SmtpServer) -> None:
    settings = settings_for(smtp)
    public_id = uuid4()

    await send(settings, lead_email(settings, public_id))

    [got] = smtp.received
    assert got.mail_from == "receipts@payguard.example"
    assert got.rcpt_tos == [RECIPIENT]
    assert got.message["From"] == "payguard <receipts@payguard.example>"
    assert got.message["To"] == RECIPIENT
    assert got.message["Subject"] == "Your lead: Roof repair in Leeds"
    assert got.message["Message-ID"] == f"<outbox-{public_id}@payguard.example>"
    assert got.message["Date"] is not None
    body = got.message.get_content()
    assert "Roof repair in Leeds" in body
    assert "GET /v1/leads/purchased" in body


async def test_a_receipt_says_credits_amount_balance_and_where_to_see_it(smtp: SmtpServer) -> None:
    settings = settings_for(smtp)
    message = compose(
        settings, kind=EmailKind.CREDITS_PURCHASED, public_id=uuid4(), recipient=RECIPIENT, payload=RECEIPT
    )

    await send(settings, message)

    [got] = smtp.received
    assert got.message["Subject"] == "Receipt: 500 credits"
    body = got.message.get_content()
    assert "500 credits were added to your account for 45.00 USD." in body
    assert "Your balance is now 1,600 credits." in body
    assert "GET /v1/credits/purchases/12" in body


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        (4_500, "usd", "45.00 USD"),
        (5, "eur", "0.05 EUR"),
        (1_500, "jpy", "1,500 JPY"),
        (1_234, "kwd", "1.234 KWD"),
    ],
)
def test_an_amount_is_shown_in_the_currency_s_own_units(amount: int, currency: str, shown: str) -> None:
    payload = {**RECEIPT, "amount": amount, "currency": currency}
    message = compose(
        settings_for(),
        kind=EmailKind.CREDITS_PURCHASED,
        public_id=uuid4(),
        recipient=RECIPIENT,
        payload=payload,
    )
    assert f"for {shown}." in message.get_content()


def test_a_retry_of_a_row_carries_its_message_id_and_another_row_does_not() -> None:
    settings = settings_for()
    row, other = uuid4(), uuid4()

    first, again, second = lead_email(settings, row), lead_email(settings, row), lead_email(settings, other)

    assert first["Message-ID"] == again["Message-ID"] == f"<outbox-{row}@payguard.example>"
    assert second["Message-ID"] != first["Message-ID"]


def test_a_sender_without_a_domain_gets_a_reserved_one_in_the_message_id() -> None:
    row = uuid4()
    message = lead_email(settings_for(mail_from="payguard"), row)
    assert message["Message-ID"] == f"<outbox-{row}@payguard.invalid>"


async def test_a_line_break_in_a_lead_title_adds_no_header_and_no_recipient(smtp: SmtpServer) -> None:
    settings = settings_for(smtp)

    await send(settings, lead_email(settings, title="Roof\r\nBcc: thief@attacker.example\r\n\r\nfake body"))

    [got] = smtp.received
    assert got.rcpt_tos == [RECIPIENT]
    assert got.message["Bcc"] is None
    assert got.message["Subject"] == "Your lead: Roof Bcc: thief@attacker.example fake body"
    assert set(got.message.keys()) == {
        "From", "To", "Subject", "Date", "Message-ID", "Content-Type", "Content-Transfer-Encoding", "MIME-Version"
    }  # fmt: skip


def test_a_line_break_in_a_recipient_is_refused_for_good() -> None:
    with pytest.raises(NeedsHuman, match="cannot be composed"):
        compose(
            settings_for(),
            kind=EmailKind.LEAD_PURCHASED,
            public_id=uuid4(),
            recipient="buyer@example.com\r\nBcc: thief@attacker.example",
            payload=LEAD,
        )


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        ("password_reset", LEAD),
        (EmailKind.LEAD_PURCHASED, {"lead_id": 7}),
        (EmailKind.CREDITS_PURCHASED, LEAD),
    ],
    ids=["unknown kind", "lead without title", "receipt without amount"],
)
def test_an_email_that_cannot_be_written_needs_a_human(kind: str, payload: dict[str, Any]) -> None:
    with pytest.raises(NeedsHuman):
        compose(settings_for(), kind=kind, public_id=uuid4(), recipient=RECIPIENT, payload=payload)


@pytest.mark.parametrize("at", ["RCPT", "DATA"])
async def test_a_4xx_refusal_is_retried_later(smtp: SmtpServer, at: Any) -> None:
    settings = settings_for(smtp)
    smtp.refuse("451 4.3.0 try again later", at=at)

    with pytest.raises(RetryLater, match="451"):
        await send(settings, lead_email(settings))
    assert smtp.received == []


@pytest.mark.parametrize(
    ("at", "reply"), [("RCPT", "550 5.1.1 no such user"), ("DATA", "554 5.7.1 message refused")]
)
async def test_a_5xx_refusal_needs_a_human(smtp: SmtpServer, at: Any, reply: str) -> None:
    settings = settings_for(smtp)
    smtp.refuse(reply, at=at)

    with pytest.raises(NeedsHuman, match=reply[:3]):
        await send(settings, lead_email(settings))
    assert smtp.received == []


async def test_a_server_that_is_down_is_retried_and_delivers_once_it_is_back(smtp: SmtpServer) -> None:
    settings = settings_for(smtp)
    message = lead_email(settings)
    smtp.stop()
    try:
        started = time.monotonic()
        with pytest.raises(RetryLater, match=f"{HOST}:{smtp.port}"):
            await send(settings, message)
        assert time.monotonic() - started < settings.smtp_timeout_s
    finally:
        smtp.start()

    await send(settings, message)
    assert [r.message["Message-ID"] for r in smtp.received] == [message["Message-ID"]]


async def test_a_server_that_never_answers_is_given_up_on_within_the_timeout() -> None:
    async with silent_server() as port:
        settings = settings_for(smtp_host=HOST, smtp_port=port, smtp_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(RetryLater):
            await send(settings, lead_email(settings))
        assert time.monotonic() - started < 1.5


async def test_a_slow_server_is_given_up_on_within_the_timeout_for_the_whole_send(smtp: SmtpServer) -> None:
    smtp.reply_delay_s = 0.3  # each reply within the timeout, all of them together past it
    settings = settings_for(smtp, smtp_timeout_s=0.5)

    started = time.monotonic()
    with pytest.raises(RetryLater, match=r"no answer within 0\.5 s"):
        await send(settings, lead_email(settings))
    assert time.monotonic() - started < 1.5
    assert smtp.received == []


async def test_no_smtp_host_is_a_clear_retry_later() -> None:
    settings = settings_for()
    with pytest.raises(RetryLater, match="SMTP_HOST is not set"):
        await send(settings, lead_email(settings))


async def test_starttls_required_never_sends_in_clear_to_a_server_without_it(smtp: SmtpServer) -> None:
    settings = settings_for(smtp, smtp_starttls=True)

    with pytest.raises(RetryLater, match="STARTTLS"):
        await send(settings, lead_email(settings))
    assert smtp.received == []


async def test_a_login_with_the_right_password_delivers(smtp: SmtpServer) -> None:
    smtp.require_login("mailer", "correct horse")
    settings = settings_for(smtp, smtp_username="mailer", smtp_password="correct horse")

    await send(settings, lead_email(settings))

    [got] = smtp.received
    assert got.login == "mailer"


@pytest.mark.parametrize(
    "credentials",
    [{"smtp_username": "mailer", "smtp_password": "wrong-battery-staple"}, {}],
    ids=["wrong password", "no login"],
)
async def test_a_refused_login_is_retried_without_showing_the_password(
    smtp: SmtpServer, credentials: dict[str, str]
) -> None:
    # retried, not dead: an operator fixes the secret and the next attempt delivers
    smtp.require_login("mailer", "correct horse")
    settings = settings_for(smtp, **credentials)

    with pytest.raises(RetryLater, match=r"53[05]") as refused:
        await send(settings, lead_email(settings))

    assert "wrong-battery-staple" not in str(refused.value)
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    assert smtp.received == []
