"""Stripe-Signature parsing and verification, against signatures the Stripe SDK makes itself."""

from __future__ import annotations

import pytest
import stripe
from hypothesis import example, given, settings
from hypothesis import strategies as st

from app.webhooks.signature import (
    MAX_SIGNATURES,
    SignatureError,
    parse_header,
    sign,
    signature_header,
    verify,
)

HEX = "0123456789abcdef"

bodies = st.text()  # the SDK signs text; its UTF-8 is what arrives
secrets = st.text()
timestamps = st.integers(min_value=0, max_value=10**12 - 1)  # 12 digits: the parser's limit
tolerances = st.integers(min_value=0, max_value=3600)


def other_secrets(configured: list[str]) -> st.SearchStrategy[str]:
    """Secrets that are not configured; HMAC pads its key with NULs, so "k" and "k\\0" are one key."""
    keys = {s.rstrip("\0") for s in configured}
    return secrets.filter(lambda s: s.rstrip("\0") not in keys)


def stripe_header(body: str, secret: str, timestamp: int) -> str:
    return stripe.WebhookSignature.generate_signature_header(body, secret, timestamp)


@st.composite
def moments(draw: st.DrawFn) -> tuple[int, int, float]:
    """(timestamp, tolerance, now) with now within tolerance of the timestamp."""
    timestamp, tolerance = draw(timestamps), draw(tolerances)
    return timestamp, tolerance, timestamp + draw(st.floats(min_value=-tolerance, max_value=tolerance))


@given(bodies, secrets, moments())
def test_a_signature_made_by_the_stripe_sdk_verifies(body: str, secret: str, moment: tuple) -> None:
    timestamp, tolerance, now = moment
    header = stripe_header(body, secret, timestamp)
    verify(body.encode(), header, [secret], now=now, tolerance_s=tolerance)
    assert signature_header(body.encode(), secret, timestamp) == header
    assert parse_header(header) == (timestamp, [sign(body.encode(), secret, timestamp)])


@given(st.binary(min_size=1), secrets, timestamps, st.data())
def test_any_single_byte_change_of_the_body_fails(
    body: bytes, secret: str, timestamp: int, data: st.DataObject
) -> None:
    header = signature_header(body, secret, timestamp)
    at = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    byte = data.draw(st.integers(min_value=0, max_value=255).filter(lambda b: b != body[at]))
    changed = body[:at] + bytes([byte]) + body[at + 1 :]
    with pytest.raises(SignatureError, match="no signature matches"):
        verify(changed, header, [secret], now=timestamp, tolerance_s=300)


@given(bodies, secrets, timestamps, st.data())
def test_any_single_character_change_of_the_timestamp_fails(
    body: str, secret: str, timestamp: int, data: st.DataObject
) -> None:
    header = stripe_header(body, secret, timestamp)
    digits = str(timestamp)
    at = data.draw(st.integers(min_value=0, max_value=len(digits) - 1))
    char = data.draw(st.characters().filter(lambda c: c != digits[at]))
    changed = digits[:at] + char + digits[at + 1 :]
    tampered = header.replace(f"t={digits},", f"t={changed},", 1)
    # "now" is the claimed time, so only the signature can refuse it
    now = int(changed) if changed.isascii() and changed.isdigit() else timestamp
    with pytest.raises(SignatureError):
        verify(body.encode(), tampered, [secret], now=now, tolerance_s=300)


@given(bodies, secrets, timestamps, st.data())
def test_any_single_character_change_of_the_signature_fails(
    body: str, secret: str, timestamp: int, data: st.DataObject
) -> None:
    header = stripe_header(body, secret, timestamp)
    prefix, signature = header.split(",v1=")
    at = data.draw(st.integers(min_value=0, max_value=len(signature) - 1))
    char = data.draw(st.one_of(st.sampled_from(HEX + HEX.upper()), st.characters()))
    if char == signature[at]:
        return
    tampered = f"{prefix},v1={signature[:at]}{char}{signature[at + 1 :]}"
    with pytest.raises(SignatureError):
        verify(body.encode(), tampered, [secret], now=timestamp, tolerance_s=300)


@given(bodies, secrets, timestamps, tolerances, st.floats(min_value=1e-3, max_value=1e9), st.booleans())
def test_a_timestamp_outside_the_tolerance_fails(
    body: str, secret: str, timestamp: int, tolerance: int, beyond: float, late: bool
) -> None:
    header = stripe_header(body, secret, timestamp)
    now = timestamp + tolerance + beyond if late else timestamp - tolerance - beyond
    with pytest.raises(SignatureError, match="from now"):
        verify(body.encode(), header, [secret], now=now, tolerance_s=tolerance)


names = st.one_of(
    st.sampled_from(["t", "v1", "v0", "T", "V1", " t", "t ", "v1 ", "", "=", "\uff54"]), st.text(max_size=4)
)
values = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.integers(min_value=4000, max_value=6000).map(lambda n: "9" * n),  # past int()'s digit limit
    st.text("0123456789", max_size=20),
    st.text(HEX, min_size=64, max_size=64),
    st.sampled_from(["\u0661\u0662\u0663", "²", "1_000", "+5", "-5", " 5", "5 ", "0x10", "1e9", "\u06617"]),
    st.text(),
)
items = st.one_of(st.tuples(names, values).map("=".join), st.text(max_size=8))
headers = st.one_of(
    st.text(),
    st.text(st.characters(exclude_categories=())),  # lone surrogates as well
    st.lists(items, max_size=30).map(",".join),
    st.lists(items, max_size=12).map(", ".join),
)


@settings(max_examples=300)
@given(headers)
@example("t=" + "9" * 5000 + ",v1=" + "0" * 64)
@example("t=1,t=" + "9" * 400 + ",v1=ab")
@example("t=1," + ",".join(["v1=ab"] * (MAX_SIGNATURES + 1)))
@example("t=²,v1=ab")
def test_any_header_text_parses_or_is_refused(header: str) -> None:
    try:
        timestamp, signatures = parse_header(header)
    except SignatureError:
        return
    assert 0 <= timestamp < 10**12
    assert 1 <= len(signatures) <= MAX_SIGNATURES
    assert all(isinstance(s, str) for s in signatures)


@settings(max_examples=300)
@given(st.one_of(st.none(), headers.filter(lambda h: not any("\ud800" <= c <= "\udfff" for c in h))), bodies)
@example("t=" + "9" * 400 + ",v1=" + "0" * 64, "")
@example("t=1700000000,v1=é", "")
def test_any_header_text_verifies_or_is_refused(header: str | None, body: str) -> None:
    # a header reaches us decoded from bytes, so it never holds a lone surrogate
    try:
        verify(body.encode(), header, ["whsec_a", "whsec_b"], now=1_700_000_000, tolerance_s=300)
    except SignatureError:
        return
    pytest.fail(f"an unsigned header verified: {header!r}")


@given(
    st.lists(secrets, min_size=1, max_size=5, unique=True),
    st.data(),
    bodies,
    timestamps,
)
def test_during_rotation_a_signature_by_any_configured_secret_verifies(
    configured: list[str], data: st.DataObject, body: str, timestamp: int
) -> None:
    signer = data.draw(st.sampled_from(configured))
    header = stripe_header(body, signer, timestamp)
    verify(body.encode(), header, configured, now=timestamp, tolerance_s=300)
    outsider = data.draw(other_secrets(configured))
    with pytest.raises(SignatureError, match="no signature matches"):
        verify(
            body.encode(),
            stripe_header(body, outsider, timestamp),
            configured,
            now=timestamp,
            tolerance_s=300,
        )


@given(
    st.lists(secrets, min_size=1, max_size=MAX_SIGNATURES, unique=True),
    st.data(),
    bodies,
    timestamps,
)
def test_stripe_signing_with_every_rolled_secret_verifies_with_any_one(
    signers: list[str], data: st.DataObject, body: str, timestamp: int
) -> None:
    """While a secret rolls, Stripe sends one v1 per secret; we may hold just one of them."""
    signatures = ",".join(f"v1={sign(body.encode(), s, timestamp)}" for s in signers)
    header = f"t={timestamp},{signatures},v0=ignored"
    verify(body.encode(), header, [data.draw(st.sampled_from(signers))], now=timestamp, tolerance_s=0)
    outsiders = data.draw(st.lists(other_secrets(signers), min_size=1, max_size=3))
    with pytest.raises(SignatureError, match="no signature matches"):
        verify(body.encode(), header, outsiders, now=timestamp, tolerance_s=0)
    with pytest.raises(SignatureError, match="no signature matches"):
        verify(body.encode(), header, [], now=timestamp, tolerance_s=0)


def test_examples() -> None:
    body, secret = b'{"id": "evt_1"}', "whsec_test"
    header = signature_header(body, secret, 1_700_000_000)
    verify(body, header, [secret], now=1_700_000_300, tolerance_s=300)
    with pytest.raises(SignatureError, match="from now"):
        verify(body, header, [secret], now=1_700_000_301, tolerance_s=300)
    with pytest.raises(SignatureError, match="missing"):
        verify(body, "", [secret], now=1_700_000_000, tolerance_s=300)
    assert sign(body, "k", 5) == sign(body, "k\0", 5)  # HMAC pads keys with NULs: not a second secret
    assert parse_header(" t=5 , v1=ab , v0=cd , junk , v1=ef") == (5, ["ab", "ef"])
    for bad in ["v1=ab", "t=5", "t=5,v0=ab", "t=x,v1=ab", "t=1234567890123,v1=ab"]:
        with pytest.raises(SignatureError):
            parse_header(bad)
