import logging

from tests.conftest import ADMIN, Client, auth, token

A = {**auth(ADMIN, admin=True), "content-type": "application/json"}


async def test_probe(client: Client, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="payguard.http")
    for body in [
        b'{"title":"\xff\xfe","price_credits":1}',
        b'{"title":"a","price_credits":1,"details":{"a":' + b"[" * 20000 + b"]" * 20000 + b"}}",
        b'{"title":"a","price_credits":1,"details":{"a":' + b"[" * 300 + b"]" * 300 + b"}}",
        b'{"title":"a","price_credits":1,"details":{"a":' + b"[" * 3000 + b"]" * 3000 + b"}}",
    ]:
        caplog.clear()
        r = await client.post("/admin/leads", content=body, headers=A)
        print(r.status_code, r.text[:100])
        for rec in caplog.records:
            if rec.exc_info:
                import traceback

                print("".join(traceback.format_exception(*rec.exc_info))[-2500:])
    r = await client.get("/v1/credits/balance", headers={"Authorization": "Bearer " + token("u\x00")})
    for rec in caplog.records:
        if rec.exc_info:
            import traceback

            print("".join(traceback.format_exception(*rec.exc_info))[-1500:])
