"""Outbox emails as messages, and handing them to the SMTP server.

The worker calls `compose` then `send` for each claimed `outbox_emails` row. A failure is
raised as the retry engine's `RetryLater` (a later attempt can succeed) or `NeedsHuman`
(no attempt will), never as a bare SMTP error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Any
from uuid import UUID

import aiosmtplib

from app.config import Settings
from app.failures.engine import NeedsHuman, RetryLater
from app.notifications.service import EmailKind

FALLBACK_DOMAIN = "payguard.invalid"  # RFC 2606: a Message-ID domain that can never clash

# Stripe's minor units: two decimals unless the currency is listed here
_ZERO_DECIMAL = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
_THREE_DECIMAL = frozenset("bhd jod kwd omr tnd".split())
# no login, a weak mechanism, bad credentials, TLS needed to log in: SMTP settings, not the email
_LOGIN_CODES = frozenset({530, 534, 535, 538})


def message_id(settings: Settings, public_id: UUID) -> str:
    """The same for every attempt at one outbox row, so a receiver can drop a resent copy."""
    _, at, domain = parseaddr(settings.mail_from)[1].rpartition("@")
    return f"<outbox-{public_id}@{domain if at and domain else FALLBACK_DOMAIN}>"


def format_amount(amount: int, currency: str) -> str:
    """Minor units as a person reads them: 4500, "usd" -> "45.00 USD"."""
    places = 0 if currency.lower() in _ZERO_DECIMAL else 3 if currency.lower() in _THREE_DECIMAL else 2
    return f"{Decimal(amount).scaleb(-places):,.{places}f} {currency.upper()}"


def _one_line(text: str) -> str:
    # a title is user text: a CR/LF in it must not start a header or a line of its own
    return " ".join(str(text).split())


def _lead_purchased(payload: dict[str, Any]) -> tuple[str, str]:
    title = _one_line(payload["title"])
    body = (
        f'You bought the lead "{title}".\n\n'
        "Its details are at GET /v1/leads/purchased.\n\n"
        f"Lead: {payload['lead_id']}\n"
        f"Purchase: {payload['purchase_id']}\n"
    )
    return f"Your lead: {title}", body


def _credits_purchased(payload: dict[str, Any]) -> tuple[str, str]:
    credits, purchase_id = int(payload["credits"]), payload["purchase_id"]
    body = (
        f"{credits:,} credits were added to your account for "
        f"{format_amount(int(payload['amount']), str(payload['currency']))}.\n"
        f"Your balance is now {int(payload['balance']):,} credits.\n\n"
        f"This purchase: GET /v1/credits/purchases/{purchase_id}\n"
    )
    return f"Receipt: {credits:,} credits", body


def _tickets_issued(payload: dict[str, Any]) -> tuple[str, str]:
    codes, ticket_type = [str(code) for code in payload["codes"]], _one_line(payload["ticket_type"])
    body = (
        f"Your {len(codes)} ticket{'s' if len(codes) > 1 else ''} for {ticket_type}:\n\n"
        + "".join(f"  {code}\n" for code in codes)
        + f"\nThey are also at GET /v1/reservations/{payload['reservation_id']}\n"
    )
    return f"Your tickets: {ticket_type}", body


_WRITERS: dict[str, Callable[[dict[str, Any]], tuple[str, str]]] = {
    EmailKind.LEAD_PURCHASED: _lead_purchased,
    EmailKind.CREDITS_PURCHASED: _credits_purchased,
    EmailKind.TICKETS_ISSUED: _tickets_issued,
}


def compose(
    settings: Settings, *, kind: str, public_id: UUID, recipient: str, payload: dict[str, Any]
) -> EmailMessage:
    """The email for one outbox row; composing the same row again gives the same Message-ID.

    Raises NeedsHuman for an unknown kind or a payload or recipient no message can be made of.
    """
    writer = _WRITERS.get(kind)
    if writer is None:
        raise NeedsHuman(f"outbox email {public_id}: unknown kind {kind!r}")
    try:
        subject, body = writer(payload)
        message = EmailMessage()
        message["From"] = settings.mail_from
        message["To"] = recipient
        message["Subject"] = subject
        message["Date"] = formatdate(usegmt=True)
        message["Message-ID"] = message_id(settings, public_id)
        message.set_content(body)
    except (KeyError, TypeError, ValueError) as exc:  # a row's contents never change: retrying cannot help
        raise NeedsHuman(f"outbox email {public_id} ({kind}) cannot be composed: {exc!r}") from exc
    return message


async def send(settings: Settings, message: EmailMessage) -> None:
    """Hand the message to the SMTP server; returns once the server has accepted it.

    SMTP_STARTTLS=true requires STARTTLS (a server that does not offer it is a failure, never a
    send in clear); false never upgrades. SMTP_TIMEOUT_S bounds the whole exchange.
    Raises RetryLater when a later attempt can succeed (server down, slow or refusing with 4xx,
    TLS failing, login refused) and NeedsHuman when it cannot (5xx for sender, recipient or message).
    """
    if settings.smtp_host is None:
        raise RetryLater("SMTP_HOST is not set: nowhere to send the email")
    try:
        async with asyncio.timeout(settings.smtp_timeout_s):  # a send never outlives the worker's lease
            await aiosmtplib.send(
                message,
                hostname=settings.smtp_host,
                port=settings.smtp_port,
                username=settings.smtp_username or None,
                password=settings.smtp_password if settings.smtp_username else None,
                start_tls=settings.smtp_starttls,  # not None: "upgrade if offered" would fall back to clear
                timeout=settings.smtp_timeout_s,
            )
    except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
        raise _classify(settings, exc) from None  # the text says it all; a cause could carry the password


def _classify(
    settings: Settings, exc: aiosmtplib.SMTPException | OSError | ValueError
) -> RetryLater | NeedsHuman:
    where = f"SMTP {settings.smtp_host}:{settings.smtp_port}"
    error: RetryLater | NeedsHuman
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError) or (
        isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code in _LOGIN_CODES
    ):
        # retried: once an operator fixes the secret, the next attempt delivers
        error = RetryLater(f"{where}: login refused: {exc.code} {exc.message}")
    elif isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        text = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        permanent = all(r.code >= 500 for r in exc.recipients)
        error = (NeedsHuman if permanent else RetryLater)(f"{where}: recipient refused: {text}")
    elif isinstance(exc, aiosmtplib.SMTPResponseException):
        error = (NeedsHuman if exc.code >= 500 else RetryLater)(f"{where}: {exc.code} {exc.message}")
    elif isinstance(exc, aiosmtplib.SMTPNotSupported):  # e.g. SMTPUTF8 for a non-ASCII address
        error = NeedsHuman(f"{where}: {exc.message}")
    elif isinstance(exc, TimeoutError) and not str(exc):  # our bound on the whole exchange
        error = RetryLater(f"{where}: no answer within {settings.smtp_timeout_s} s")
    elif isinstance(exc, aiosmtplib.SMTPException | OSError):  # down, reset, timed out, TLS failed
        error = RetryLater(f"{where}: {type(exc).__name__}: {exc}")
    else:  # ValueError: aiosmtplib refuses an address it cannot send safely
        error = NeedsHuman(f"{where}: {exc}")
    if settings.smtp_password:
        error.args = (str(error).replace(settings.smtp_password, "[redacted]"),)
    return error
