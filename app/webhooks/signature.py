"""Stripe-Signature verification: HMAC-SHA256 over "{t}.{body}", as Stripe signs its deliveries.

Pure functions: the header parser and the check are tested without HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

MAX_SIGNATURES = 8  # Stripe sends one v1 per secret in rotation; more is an attack on our CPU


class SignatureError(Exception):
    """Why a delivery is not from Stripe (or not fresh); the message is safe to show the sender."""


def parse_header(header: str) -> tuple[int, list[str]]:
    """`t=1700000000,v1=abc…,v1=def…,v0=…` -> (timestamp, v1 signatures); other schemes are ignored."""
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            if not value.isascii() or not value.isdigit() or len(value) > 12:
                raise SignatureError("the Stripe-Signature timestamp is not a Unix time")
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value)
    if timestamp is None:
        raise SignatureError("the Stripe-Signature header has no timestamp")
    if not signatures:
        raise SignatureError("the Stripe-Signature header has no v1 signature")
    if len(signatures) > MAX_SIGNATURES:
        raise SignatureError(f"the Stripe-Signature header has more than {MAX_SIGNATURES} signatures")
    return timestamp, signatures


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The v1 signature Stripe computes for `body` sent at `timestamp`."""
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def verify(body: bytes, header: str | None, secrets: Sequence[str], *, now: float, tolerance_s: int) -> None:
    """Raise SignatureError unless one of `secrets` signed `body` within `tolerance_s` of `now`."""
    if not header:
        raise SignatureError("the Stripe-Signature header is missing")
    timestamp, signatures = parse_header(header)
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(f"the signature's timestamp is more than {tolerance_s} s from now")
    expected = [sign(body, secret, timestamp).encode() for secret in secrets]
    # every comparison runs, whatever matches: the time taken says nothing about the secrets
    matched = False
    for candidate in signatures:
        for good in expected:
            matched |= hmac.compare_digest(candidate.encode(), good)
    if not matched:
        raise SignatureError("no signature matches a configured webhook secret")


def signature_header(body: bytes, secret: str, timestamp: int) -> str:
    """A Stripe-Signature header for `body` (tests, the tour's `payguard sign-event`)."""
    return f"t={timestamp},v1={sign(body, secret, timestamp)}"
