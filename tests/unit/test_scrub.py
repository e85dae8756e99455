"""The scrubber of error logs: what it removes, what it keeps on purpose, and that it is safe to rerun."""

from __future__ import annotations

import random
import string
import time
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from app.errors.scrub import REDACTED, is_card_like, looks_secret, luhn_valid, scrub_json, scrub_text

STRIPE_KEY = "sk_" + "live_" + "51HxQpL2eZvKYlo2C0123456789"
JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1MSJ9.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.def-ghi~jk+l/m=", "Authorization: [REDACTED] [REDACTED]"),
        ("sent bearer\tXYZ123 upstream", "sent bearer [REDACTED] upstream"),
        ("BEARER Bearer abc123", "BEARER [REDACTED]"),
        ("password: password: x", "password: [REDACTED] [REDACTED]"),
        (f"token {JWT}!", "token [REDACTED:jwt]!"),
        (f"got {JWT} back", "got [REDACTED:jwt] back"),
        ("unsigned eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1In0. token", "unsigned [REDACTED:jwt] token"),
        (f"key={STRIPE_KEY}", "key=[REDACTED:stripe-key]"),
        ("sk_test_abc rk_live_def rk_test_ghi whsec_jkl", " ".join(["[REDACTED:stripe-key]"] * 4)),
        ("pi_3MtwBwLkdIwHu7ix28a3tqPa_secret_YrKJUKribcBjcG8HVhfZluoGH", "[REDACTED:client-secret]"),
        ("publishable pk_live_51HxQ is public", "publishable pk_live_51HxQ is public"),
        ("postgres://admin:hunter2@db:5432/payguard", "postgres://admin:[REDACTED]@db:5432/payguard"),
        (
            "https://x.test/cb?code=1&access_token=abc&page=2",
            "https://x.test/cb?code=1&access_token=[REDACTED]&page=2",
        ),
        ('{"password": "correct horse", "user": "bob"}', '{"password": [REDACTED], "user": "bob"}'),
        ("client_secret='s3cr3t' next", "client_secret=[REDACTED] next"),
        ("X-Api-Key: k-123 and cookie=a", "X-Api-Key: [REDACTED] and cookie=[REDACTED]"),
        ("card 4242424242424242 declined", "card [REDACTED:card] declined"),
        ("card 4242 4242 4242 4242 exp 12/25", "card [REDACTED:card] exp 12/25"),
        ("amex 3782-822463-10005.", "amex [REDACTED:card]."),
        ("19 digits 4242 4242 4242 4242 428", "19 digits [REDACTED:card]"),
        ("qty 12 4242424242424242", "qty 12 [REDACTED:card]"),
        # kept on purpose: numbers that fail the Luhn check, too short or too long, not ASCII digits
        ("order 1234567812345678", "order 1234567812345678"),
        ("phone +1 555 0100, at 2024-01-15 10:30:00", "phone +1 555 0100, at 2024-01-15 10:30:00"),
        ("twelve 424242424242", "twelve 424242424242"),
        ("twenty 42424242424242424242", "twenty 42424242424242424242"),
        ("hosts api.example.com and v1.2.3 stay", "hosts api.example.com and v1.2.3 stay"),
        ("no secrets here", "no secrets here"),
    ],
)
def test_scrub_text(text: str, expected: str) -> None:
    assert scrub_text(text) == expected


def test_scrub_json_redacts_secret_keys_whatever_their_value_and_scrubs_the_rest() -> None:
    value = {
        "password": {"old": "a", "new": "b"},
        "Authorization": "Bearer x",
        "X-API-KEY": 123,
        "apiKey": None,
        "headers": [{"Set-Cookie": "s=1"}, {"accept": "text/html"}],
        "pan": 4242424242424242,
        "float_pan": 4242424242424242.0,
        "amount": 1250,
        "ratio": 0.5,
        "ok": True,
        "note": f"with {STRIPE_KEY}",
        STRIPE_KEY: 1,
        "sk_live_other": 2,
    }
    assert scrub_json(value) == {
        "password": REDACTED,
        "Authorization": REDACTED,
        "X-API-KEY": REDACTED,
        "apiKey": REDACTED,
        "headers": [{"Set-Cookie": REDACTED}, {"accept": "text/html"}],
        "pan": REDACTED,
        "float_pan": REDACTED,
        "amount": 1250,
        "ratio": 0.5,
        "ok": True,
        "note": "with [REDACTED:stripe-key]",
        "[REDACTED:stripe-key]": 1,
        "[REDACTED:stripe-key]#": 2,  # two keys scrubbed to one marker: both values kept
    }


@pytest.mark.parametrize(
    "name",
    ["password", "db_password", "PASSWD", "client_secret", "access-token", "Authorization", "x-api-key",
     "apiKey", "Cookie", "set-cookie", "aws_credentials", "private_key", "card_number", "cvc", "CVV2"],
)  # fmt: skip
def test_secret_names(name: str) -> None:
    assert looks_secret(name)


@pytest.mark.parametrize("name", ["user", "message", "amount", "card_brand", "last4", "author", "keyboard"])
def test_ordinary_names(name: str) -> None:
    assert not looks_secret(name)


def test_luhn() -> None:
    for card in ("4242424242424242", "378282246310005", "5555555555554444", "6011111111111117"):
        assert luhn_valid(card) and is_card_like(card)
    assert not luhn_valid("4242424242424241")
    assert not is_card_like("424242424242")  # 12 digits
    assert not is_card_like("4242424242424242424242")  # 22 digits


# --- properties -----------------------------------------------------------------------------


def luhn_complete(prefix: str) -> str:
    """`prefix` with the check digit that makes it Luhn-valid."""
    return next(prefix + d for d in string.digits if luhn_valid(prefix + d))


@st.composite
def cards(draw: st.DrawFn) -> tuple[str, str]:
    """A Luhn-valid number of 13-19 digits, and how it is written (groups joined by spaces or dashes)."""
    length = draw(st.integers(13, 19))
    digits = luhn_complete(draw(st.text(string.digits, min_size=length - 1, max_size=length - 1)))
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=5)))
    separator = draw(st.sampled_from(["", " ", "-"]))
    parts = [digits[a:b] for a, b in zip([0, *cuts], [*cuts, length], strict=True)]
    return digits, separator.join(parts) if separator else digits


TOKEN_CHARS = string.ascii_letters + string.digits
SECRETS = st.one_of(
    st.builds(lambda t: f"Bearer {t}", st.text(TOKEN_CHARS + "-._~+/", min_size=12, max_size=40)),
    st.builds(
        lambda a, b, c: f"eyJ{a}.{b}.{c}",
        *[st.text(TOKEN_CHARS + "_-", min_size=1, max_size=30) for _ in range(3)],
    ),
    st.builds(
        lambda p, k: f"{p}_{k}",
        st.sampled_from(["sk_live", "sk_test", "rk_live", "rk_test", "whsec"]),
        st.text(TOKEN_CHARS, min_size=1, max_size=40),
    ),
)
# the words around a secret: any text, a space away from it (a digit glued to a card is another number)
WORDS = st.text(max_size=30)


@given(st.text(st.characters(exclude_categories=["Nd"]), max_size=30), cards(), WORDS)
def test_a_card_number_never_survives(before: str, card: tuple[str, str], after: str) -> None:
    digits, written = card
    assume(not any(c.isdigit() for c in after))
    scrubbed = scrub_text(f"{before} {written} {after}")
    assert digits not in "".join(c for c in scrubbed if c.isdigit())


@pytest.mark.parametrize(
    "text",
    ["1 4242424242424242", "4242 4242 4242 4242 1", "12 34 4242-4242-4242-4242 56", "7 378282246310005 7",
     "0 4242 4242 4242 4242 0 0", "2024-01-15 4242424242424242 10:30"],
)  # fmt: skip
def test_a_card_number_among_other_numbers_never_survives(text: str) -> None:
    scrubbed = scrub_text(text)
    assert "[REDACTED:card]" in scrubbed
    assert not any(
        card in scrubbed.replace(" ", "").replace("-", "") for card in ("4242424242424242", "378282246310005")
    )


@given(WORDS, SECRETS, WORDS)
def test_a_token_or_key_never_survives(before: str, secret: str, after: str) -> None:
    body = secret.removeprefix("Bearer ")  # a Bearer's token; the whole of the others
    assume(body not in before and body not in after)
    assert body not in scrub_text(f"{before} {secret} {after}")


@given(
    st.sampled_from(["password", "api_key", "Authorization", "session_token", "cvc"]),
    st.text(TOKEN_CHARS + "-._~+/!@#$%", min_size=1),
    st.text(min_size=1).map(lambda t: t.replace('"', "")),
)
def test_a_secret_named_parameter_never_survives(name: str, word: str, quoted: str) -> None:
    assert scrub_text(f"{name}={word}") == f"{name}={REDACTED}"
    assert scrub_text(f'"{name}": "{quoted}"') == f'"{name}": {REDACTED}'


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | cards().map(lambda c: c[1])
    | SECRETS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12) | SECRETS, inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(JSON)
def test_scrubbing_twice_changes_nothing_more(value: Any) -> None:
    once = scrub_json(value)
    assert scrub_json(once) == once


@given(st.text(alphabet=st.characters(exclude_characters="eotwEOTW0123456789_=:", codec="utf-8")))
def test_text_without_anything_secret_like_is_kept(text: str) -> None:
    assert scrub_text(text) == text


@pytest.mark.parametrize(
    "pathological",
    ["a." * 32_768, "token" * 13_000, "1 " * 32_768, "1-" * 32_768, "eyJ" + "a." * 32_000, "://a:" * 13_000,
     "x=" * 32_000, "token=" * 10_000, "4" * 65_536, "Bearer " * 9_000],
)  # fmt: skip
def test_a_64_kib_string_of_any_shape_is_scrubbed_quickly(pathological: str) -> None:
    started = time.perf_counter()
    scrub_text(pathological)
    assert time.perf_counter() - started < 2.0  # linear patterns: a worst case is a fraction of that


def test_random_prose_with_card_numbers() -> None:
    rng = random.Random(7)
    for _ in range(200):
        card = luhn_complete("".join(rng.choice(string.digits) for _ in range(15)))
        scrubbed = scrub_text(f"paid with {card} on order {rng.randint(10**6, 10**9)}")
        assert card not in scrubbed and "[REDACTED:card]" in scrubbed
