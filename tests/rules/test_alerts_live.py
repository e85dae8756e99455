"""The chart's alerts on a real Prometheus scraping a running payguard: failures driven for real go pending,
then firing; Alertmanager, with the chart's routing, posts critical ones to the critical Slack channel and
warnings to the warning channel, with the runbook link, and says so again once an alert is resolved."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import asyncpg
import httpx
import pytest

from app.credits.service import PURCHASE_METADATA
from tests.fixtures.alerting import (
    JOBS,
    WAIT_S,
    WORKER_JOB,
    LiveStack,
    buy_lead,
    deliver_event,
    forge_webhooks,
    run_job,
    until,
)
from tests.fixtures.app import ADMIN, auth, connect
from tests.fixtures.prometheus import NAMESPACE
from tests.fixtures.webhooks import event, signed

pytestmark = pytest.mark.timeout(120)

RUNBOOKS = "https://github.com/payguard/payguard/blob/main/docs/runbooks"
CRITICAL, WARNINGS = "#payguard-critical", "#payguard-warnings"


def about(name: str, status: str = "FIRING") -> Any:
    """Slack attachments about alert `name` whose title says `status` (FIRING or RESOLVED)."""
    return lambda m: m["title"].startswith(f"[{status}") and f"] {name} " in m["title"]


def assert_announced(live: LiveStack, message: dict[str, Any], name: str, channel: str) -> None:
    """In its own channel only, with the summary, the description and the runbook link."""
    assert message["channel"] == channel, message
    assert f"Runbook: {RUNBOOKS}/{name}.md" in message["text"], message["text"]
    other = WARNINGS if channel == CRITICAL else CRITICAL
    assert live.slack.messages(lambda m: m["channel"] == other and f"] {name} " in m["title"]) == []


def assert_alert(alert: dict[str, Any], seen: list[str], name: str, severity: str) -> None:
    assert seen[0] == "pending" and seen[-1] == "firing", seen  # it waited out its `for` first
    assert alert["labels"]["severity"] == severity and alert["labels"]["namespace"] == NAMESPACE
    assert alert["annotations"]["runbook_url"] == f"{RUNBOOKS}/{name}.md"
    assert alert["annotations"]["summary"] and alert["annotations"]["description"]


async def test_a_stalled_worker_fires_queue_stalled_on_the_critical_channel_until_it_drains_the_queue(
    live: LiveStack,
) -> None:
    async with live.worker() as worker:
        # scraped once while idle, so that the lag it observes later is an increase Prometheus can see
        await until(
            lambda: live.prometheus.targets_up().get(WORKER_JOB) == 1.0, "the worker is scraped", WAIT_S
        )
        worker.signal(signal.SIGSTOP)  # stalled: it takes no work, and nothing else does
        async with live.http() as http:
            await deliver_event(http, "pi_stalled")  # accepted at once, then waiting

        alert, seen = await live.until_alert("PayguardQueueStalled", queue="webhook_events")
        assert_alert(alert, seen, "PayguardQueueStalled", "critical")
        assert "webhook_events" in alert["annotations"]["description"]
        fired = await live.until_slack(about("PayguardQueueStalled"), "Slack hears of the stall")
        assert_announced(live, fired, "PayguardQueueStalled", CRITICAL)
        assert "*The webhook_events queue is stalled* (critical, payguard)" in fired["text"]

        worker.signal(signal.SIGCONT)  # it handles the event: nothing waits any more
        await live.until_gone("PayguardQueueStalled", queue="webhook_events")
        resolved = await live.until_slack(
            about("PayguardQueueStalled", "RESOLVED"), "Slack hears it resolved"
        )
        assert_announced(live, resolved, "PayguardQueueStalled", CRITICAL)
        # handled many seconds after its receipt: the lag says so too
        alert, seen = await live.until_alert("PayguardWebhookProcessingLag")
        assert_alert(alert, seen, "PayguardWebhookProcessingLag", "warning")


async def test_forged_webhooks_fire_signature_rejections_on_the_warning_channel(live: LiveStack) -> None:
    async with live.http() as http:
        # a counter's first sample is its baseline: the rejections that count come after it
        await forge_webhooks(http, 1)
        await live.until_scraped('payguard_webhooks_received_total{outcome="bad_signature"}')
        await forge_webhooks(http, 5)

    alert, seen = await live.until_alert("PayguardWebhookSignatureRejections")
    assert_alert(alert, seen, "PayguardWebhookSignatureRejections", "warning")
    assert float(alert["value"]) >= 4  # more than the threshold of 2 (increase() extrapolates a little)
    fired = await live.until_slack(
        about("PayguardWebhookSignatureRejections"), "Slack hears of the forgeries"
    )
    assert_announced(live, fired, "PayguardWebhookSignatureRejections", WARNINGS)
    assert "*Webhooks with bad signatures are arriving* (warning, payguard)" in fired["text"]


async def test_smtp_down_fires_email_failure_rate_then_dead_operations(live: LiveStack) -> None:
    db = await connect(live.db_url)
    live.smtp.stop()  # connections refused from now on
    try:
        async with live.worker(), live.http() as http:
            # one email at a time, so each failure raises counters Prometheus has already seen
            async def keep_buying() -> None:
                for n in range(int(WAIT_S)):
                    await buy_lead(http, f"smtp-down-{n}")
                    await asyncio.sleep(1)

            buying = asyncio.create_task(keep_buying())
            try:
                alert, seen = await live.until_alert("PayguardEmailFailureRateHigh")
            finally:
                buying.cancel()
            assert_alert(alert, seen, "PayguardEmailFailureRateHigh", "warning")
            assert float(alert["value"]) > 0.1
            fired = await live.until_slack(
                about("PayguardEmailFailureRateHigh"), "Slack hears of the failures"
            )
            assert_announced(live, fired, "PayguardEmailFailureRateHigh", WARNINGS)

            # three retries later each email is dead: a human must look
            dead, seen = await live.until_alert("PayguardFailedOperationsDead", kind="email")
            assert seen[-1] == "firing" and dead["labels"]["severity"] == "critical"
            fired = await live.until_slack(
                about("PayguardFailedOperationsDead"), "Slack hears of dead emails"
            )
            assert_announced(live, fired, "PayguardFailedOperationsDead", CRITICAL)

            async def no_retry_left() -> bool:
                return not await db.fetchval(
                    "SELECT count(*) FROM failed_operations WHERE status IN ('pending', 'retrying')"
                )

            # leave no retry due behind for the other tests' queues
            deadline = asyncio.get_running_loop().time() + WAIT_S
            while not await no_retry_left():
                assert asyncio.get_running_loop().time() < deadline, "retries never ran out"
                await asyncio.sleep(0.2)
    finally:
        live.smtp.start()
        await db.close()


async def test_jobs_that_stop_succeeding_fire_their_stale_alerts_and_reconcile_reports_what_it_found(
    live: LiveStack,
) -> None:
    async with live.http() as http:  # a payment Stripe settled whose webhook never came
        r = await http.post(
            "/v1/credits/purchases", json={"package_id": "starter"}, headers=auth("jobs-1", key="jobs-1")
        )
        assert r.status_code == 201, r.text
    live.stripe.settle(r.json()["payment_intent_id"])
    # each job succeeds once, as its CronJob runs it, and then its CronJob stops
    await asyncio.gather(*(asyncio.to_thread(run_job, live.db_url, job, live.stripe) for job in JOBS))

    stale = {
        "PayguardCleanupJobStale": "cleanup",
        "PayguardHealthJobStale": "health",
        "PayguardReconcileJobStale": "reconcile",
    }
    # found by the reconcile CronJob's run, whose own counters died with it: the run record says it
    alerts = await live.until_alerts(*stale, "PayguardReconcileFoundMissedEvents")
    for name, (alert, seen) in alerts.items():
        assert_alert(alert, seen, name, "warning")
        fired = await live.until_slack(about(name), f"Slack hears of {name}")
        assert_announced(live, fired, name, WARNINGS)
        if name in stale:
            assert alert["labels"]["exported_job"] == stale[name]
        else:
            assert float(alert["value"]) >= 1


async def test_stripe_refusals_a_locked_lead_reused_keys_and_refused_holds_fire_their_alerts(
    live: LiveStack,
) -> None:
    db = await connect(live.db_url)
    try:
        async with live.http() as http:
            lead, _ = await buy_lead(http, "money-0")  # sold: a lead to hold a lock on
            await failures(live, http, db, lead, wave=1)
            # the counters' first samples are their baselines: what counts comes after them
            for series in (
                'payguard_purchases_total{outcome="failed"}',
                'payguard_idempotency_total{outcome="mismatch"}',
                "payguard_rate_limited_total",
            ):
                await live.until_scraped(series)
            await failures(live, http, db, lead, wave=2)
    finally:
        await db.close()

    expected = {
        "PayguardPurchaseFailureRateHigh": ("critical", CRITICAL),  # Stripe refused them
        "PayguardHTTP5xxRateHigh": ("error", CRITICAL),  # and they were answered 5xx, as the timeouts were
        "PayguardDatabaseTimeouts": ("error", CRITICAL),  # the lead's row was locked past the lock timeout
        "PayguardAPILatencyHigh": ("warning", WARNINGS),  # those waited for the lock
        "PayguardPurchaseConflictsHigh": ("warning", WARNINGS),  # an Idempotency-Key reused
        "PayguardRateLimitedSpike": ("warning", WARNINGS),  # a fourth hold in a minute
        "PayguardReservationHoldsStale": (
            "warning",
            WARNINGS,
        ),  # and the holds outlive the second allowed here
    }
    for name, (alert, seen) in (await live.until_alerts(*expected)).items():
        severity, channel = expected[name]
        assert_alert(alert, seen, name, severity)
        fired = await live.until_slack(about(name), f"Slack hears of {name}")
        assert_announced(live, fired, name, channel)


async def failures(
    live: LiveStack, http: httpx.AsyncClient, db: asyncpg.Connection, lead: int, *, wave: int
) -> None:
    """Stripe refusing purchases, requests waiting on a locked row, keys reused, holds refused."""
    user = f"money-{wave}"
    for n in range(wave * 2):
        live.stripe.failures_to_inject.append(500)
        body = {"package_id": "starter"}
        r = await http.post("/v1/credits/purchases", json=body, headers=auth(user, key=f"refused-{user}-{n}"))
        assert r.status_code >= 500, r.text
    async with db.transaction():  # an operator's long transaction holds the lead's row
        await db.execute("SELECT id FROM leads WHERE id = $1 FOR UPDATE", lead)
        for n in range(wave):
            r = await http.post(f"/v1/leads/{lead}/purchase", headers=auth(user, key=f"locked-{user}-{n}"))
            assert r.status_code == 503, r.text
    for n in range(wave * 3):  # one key, another request: 422
        key = auth(user, key=f"reused-{user}-{n}")
        first = await http.post(f"/v1/leads/{lead + 1000 + n}/purchase", headers=key)
        again = await http.post(f"/v1/leads/{lead + 2000 + n}/purchase", headers=key)
        assert (first.status_code, again.status_code) == (404, 422), (first.text, again.text)
    show = {"name": user, "capacity": 100, "price": 2500, "currency": "usd"}
    created = await http.post("/admin/ticket-types", json=show, headers=auth(ADMIN, admin=True))
    hold = {"ticket_type_id": created.json()["id"], "quantity": 1}
    statuses = [
        (await http.post("/v1/reservations", json=hold, headers=auth(user))).status_code for _ in range(4)
    ]
    assert statuses == [201, 201, 201, 429], statuses


async def test_webhooks_that_cannot_be_handled_fire_webhook_failure_rate_and_pending_too_long(
    live: LiveStack,
) -> None:
    # for a purchase we never recorded: handling fails, and its retry is an hour away
    slow_retries = {"PAYGUARD_RETRY_BASE_DELAY_S": "3600", "PAYGUARD_RETRY_MAX_DELAY_S": "3600"}
    async with live.worker(**slow_retries), live.http() as http:
        await deliver_unhandleable(http, "pi_unrecorded_1")
        await live.until_scraped('payguard_work_items_total{queue="webhook_events", outcome="failed"}')
        await deliver_unhandleable(http, "pi_unrecorded_2")

        expected = {
            "PayguardWebhookFailureRateHigh": ("critical", CRITICAL),
            "PayguardFailedOperationsPendingTooLong": ("warning", WARNINGS),
        }
        for name, (alert, seen) in (await live.until_alerts(*expected)).items():
            severity, channel = expected[name]
            assert_alert(alert, seen, name, severity)
            fired = await live.until_slack(about(name), f"Slack hears of {name}")
            assert_announced(live, fired, name, channel)

        # what an operator does with them: discard each, and nothing is left pending
        admin = auth(ADMIN, admin=True)
        listed = (await http.get("/admin/failed-operations", headers=admin)).json()["items"]
        for op in listed:
            if op["kind"] == "webhook" and op["status"] in ("pending", "retrying"):
                r = await http.post(f"/admin/failed-operations/{op['id']}/discard", headers=admin)
                assert r.status_code == 200, r.text
    await live.until_gone("PayguardFailedOperationsPendingTooLong")


async def deliver_unhandleable(http: httpx.AsyncClient, intent: str) -> None:
    """payment_intent.succeeded naming a purchase we never recorded: accepted, then its handling fails."""
    paid = {"id": intent, "object": "payment_intent", "amount": 1000, "amount_received": 1000}
    paid |= {"currency": "usd", "status": "succeeded", "metadata": {PURCHASE_METADATA: "999999"}}
    raw, headers = signed(event("payment_intent.succeeded", paid))
    r = await http.post("/webhooks/stripe", content=raw, headers=headers)
    assert r.status_code == 200, r.text


async def test_a_worker_without_smtp_holds_emails_and_fires_emails_held(live: LiveStack) -> None:
    async with live.http() as http:
        await buy_lead(http, "held-1")
    async with live.worker(smtp=False):
        alert, seen = await live.until_alert("PayguardEmailsHeldNoSMTP")
    assert_alert(alert, seen, "PayguardEmailsHeldNoSMTP", "warning")
    fired = await live.until_slack(about("PayguardEmailsHeldNoSMTP"), "Slack hears of held emails")
    assert_announced(live, fired, "PayguardEmailsHeldNoSMTP", WARNINGS)


async def test_an_operator_that_does_not_answer_scrapes_fires_operator_down(live: LiveStack) -> None:
    # its scrape target is a port nobody listens on: up == 0, as when the operator's pod is gone
    await until(
        lambda: live.prometheus.targets_up().get("payguard-operator") == 0.0,
        "the operator is scraped",
        WAIT_S,
    )
    alert, _ = await live.until_alert("PayguardOperatorDown")
    assert alert["labels"]["severity"] == "critical" and alert["labels"]["namespace"] == NAMESPACE
    fired = await live.until_slack(about("PayguardOperatorDown"), "Slack hears the operator is down")
    assert_announced(live, fired, "PayguardOperatorDown", CRITICAL)
