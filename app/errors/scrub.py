"""Secrets out of error logs: what a report or a traceback may carry that must never be stored or sent.

In text (messages, every string and key of a context, Sentry events):
- `Bearer <token>`, in any case: the token;
- JWT-shaped strings: a base64url JSON header (`eyJ…`) and two to four more dot-separated segments;
- Stripe secrets: secret and restricted keys (`sk_live_…`, `sk_test_…`, `rk_live_…`, `rk_test_…`),
  webhook secrets (`whsec_…`) and PaymentIntent/SetupIntent client secrets (`pi_…_secret_…`);
  publishable keys (`pk_…`) are public by design and kept;
- the password of a URL (`scheme://user:password@host`);
- the value after `name=` or `name:` when the name looks secret (below), as in `?token=…`;
- card-like numbers: 13-19 ASCII digits, in groups joined by single spaces or dashes, that pass the
  Luhn check (other long numbers, order ids and the like, are kept).
In JSON: the whole value of a key whose name looks secret, whatever its type, and integers that are
card-like numbers. A name looks secret when, lower-cased and without punctuation, it contains one of
SECRET_NAMES. Scrubbing is idempotent, and every pattern is matched in linear time (a report is
scrubbed inside the request).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[REDACTED]"
SECRET_NAMES = (
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "apikey",
    "cookie",
    "credential",
    "privatekey",
    "cardnumber",
    "cvc",
    "cvv",
)
CARD_DIGITS = range(13, 20)

_URL_PASSWORD = re.compile(r"://([^\s:/@]++):[^\s@/]++@")
_BEARER = re.compile(r"\b(bearer)(?:\s+bearer\b)*\s+[A-Za-z0-9._~+/-]++=*", re.IGNORECASE)
_JWT = re.compile(r"(?<![A-Za-z0-9])eyJ[A-Za-z0-9_-]++\.[A-Za-z0-9_-]++(?:\.[A-Za-z0-9_-]*+){1,3}")
_STRIPE_KEY = re.compile(r"(?<![A-Za-z0-9])(?:(?:sk|rk)_(?:live|test)|whsec)_[A-Za-z0-9]++")
_CLIENT_SECRET = re.compile(r"(?<![A-Za-z0-9])(?:pi|seti)_[A-Za-z0-9]++_secret_[A-Za-z0-9]++")
_DIGIT_RUN = re.compile(r"[0-9]++(?:[ -][0-9]++)*+")
_DIGIT_GROUP = re.compile(r"[0-9]++")
_PAIR = re.compile(r"(?<![\w.-])([\w.-]++)[\"']?[ \t]*+[:=][ \t]*+")
_UNQUOTED_VALUE = re.compile(r"[^\s&,;\"']*+")
_NOT_ALNUM = re.compile(r"[^a-z0-9]")


def looks_secret(name: str) -> bool:
    """Whether a key or parameter name says its value is a secret (`X-Api-Key`, `client_secret`, ...)."""
    normalized = _NOT_ALNUM.sub("", name.lower())
    return any(part in normalized for part in SECRET_NAMES)


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def is_card_like(digits: str) -> bool:
    return len(digits) in CARD_DIGITS and luhn_valid(digits)


def scrub_text(text: str) -> str:
    """`text` with every secret described above replaced by a `[REDACTED…]` marker."""
    text = _URL_PASSWORD.sub(r"://\1:" + REDACTED + "@", text)
    text = _BEARER.sub(lambda m: m.group(1) + " " + REDACTED, text)
    text = _JWT.sub("[REDACTED:jwt]", text)
    text = _STRIPE_KEY.sub("[REDACTED:stripe-key]", text)
    text = _CLIENT_SECRET.sub("[REDACTED:client-secret]", text)
    text = _DIGIT_RUN.sub(_scrub_cards, text)  # before the pairs: `card=4242 4242 …` spans several words
    return _scrub_pairs(text)


def _scrub_cards(run: re.Match[str]) -> str:
    """In a run of digit groups, replace the longest Luhn-valid window of 13-19 digits from each group on."""
    text = run.group()
    groups = [(m.start(), m.end()) for m in _DIGIT_GROUP.finditer(text)]
    out: list[str] = []
    copied = 0
    i = 0
    while i < len(groups):
        last = _longest_card(text, groups, i)
        if last is None:
            i += 1
            continue
        out += [text[copied : groups[i][0]], "[REDACTED:card]"]
        copied = groups[last][1]
        i = last + 1
    out.append(text[copied:])
    return "".join(out)


def _longest_card(text: str, groups: list[tuple[int, int]], first: int) -> int | None:
    """The last group of the longest card-like window starting at group `first`, if any.

    The Luhn sum is kept for both parities as digits are appended (constant work per digit), so a
    run of many short groups costs at most 19 digits per group.
    """
    plain, doubled = [0, 0], [0, 0]  # sums of digits at even / odd positions from the left
    count, last = 0, None
    for j in range(first, len(groups)):
        for char in text[groups[j][0] : groups[j][1]]:
            digit = ord(char) - 48
            plain[count % 2] += digit
            doubled[count % 2] += digit * 2 - 9 if digit > 4 else digit * 2
            count += 1
        if count > CARD_DIGITS[-1]:
            break
        # the rightmost digit is not doubled: those at its parity count plain, the others doubled
        if count in CARD_DIGITS and (plain[(count - 1) % 2] + doubled[count % 2]) % 10 == 0:
            last = j
    return last


def _scrub_pairs(text: str) -> str:
    out: list[str] = []
    copied = 0
    for pair in _PAIR.finditer(text):
        start = pair.end()
        if start < copied or not looks_secret(pair.group(1)):
            continue
        end = _value_end(text, start)
        if end > start:
            out += [text[copied:start], REDACTED]
            copied = end
    out.append(text[copied:])
    return "".join(out)


def _value_end(text: str, start: int) -> int:
    if start < len(text) and text[start] in "\"'":
        closing = text.find(text[start], start + 1)
        if closing != -1:
            return closing + 1
        start += 1  # an unterminated quote: the word after it
    match = _UNQUOTED_VALUE.match(text, start)
    return match.end() if match else start


def scrub_json(value: Any) -> Any:
    """A copy of a decoded JSON value (or a Sentry event) with secrets replaced, keys included."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return REDACTED if _card_like_number(value) else value
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            name = scrub_text(key) if isinstance(key, str) else key
            while name in out:  # two keys scrubbed to one marker: keep both values
                name = f"{name}#"
            out[name] = REDACTED if isinstance(key, str) and looks_secret(key) else scrub_json(item)
        return out
    if isinstance(value, list | tuple):
        return [scrub_json(item) for item in value]
    return value


def _card_like_number(number: int | float) -> bool:
    if isinstance(number, float):
        if not number.is_integer():
            return False
        number = int(number)
    return abs(number) < 10 ** CARD_DIGITS[-1] and is_card_like(str(abs(number)))
