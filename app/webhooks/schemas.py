from __future__ import annotations

import msgspec

# Stripe's ids are short; a longer one is not Stripe's
StripeId = msgspec.Meta(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")


class Received(msgspec.Struct):
    received: bool
    duplicate: bool
