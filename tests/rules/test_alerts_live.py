"""The chart's alerts on a real Prometheus scraping a running payguard: failures driven for real go pending,
then firing; Alertmanager, with the chart's routing, posts critical ones to the critical Slack channel and
warnings to the warning channel, with the runbook link, and says so again once an alert is resolved."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.fixtures.alerting import (
    WAIT_S,
    LiveStack,
    buy_lead,
    deliver_event,
    forge_webhooks,
    run_job,
    until,
)
from tests.fixtures.app import connect
from tests.fixtures.prometheus import NAMESPACE

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


async def test_a_stalled_worker_fires_queue_stalled_on_the_critical_channel_until_a_worker_drains_it(
    live: LiveStack,
) -> None:
    async with live.http() as http:
        await deliver_event(http, "pi_stalled")  # accepted; no worker runs to handle it

    alert, seen = await live.until_alert("PayguardQueueStalled", queue="webhook_events")
    assert_alert(alert, seen, "PayguardQueueStalled", "critical")
    assert "webhook_events" in alert["annotations"]["description"]
    fired = await live.until_slack(about("PayguardQueueStalled"), "Slack hears of the stall")
    assert_announced(live, fired, "PayguardQueueStalled", CRITICAL)
    assert "*The webhook_events queue is stalled* (critical, payguard)" in fired["text"]

    async with live.worker():  # the event is handled: nothing waits any more
        await live.until_gone("PayguardQueueStalled", queue="webhook_events")
        resolved = await live.until_slack(
            about("PayguardQueueStalled", "RESOLVED"), "Slack hears it resolved"
        )
    assert_announced(live, resolved, "PayguardQueueStalled", CRITICAL)


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


async def test_a_cleanup_job_that_stops_succeeding_fires_cleanup_job_stale(live: LiveStack) -> None:
    await asyncio.to_thread(run_job, live.db_url, "cleanup")  # one success, then its CronJob stops
    alert, seen = await live.until_alert("PayguardCleanupJobStale")
    assert_alert(alert, seen, "PayguardCleanupJobStale", "warning")
    assert alert["labels"]["exported_job"] == "cleanup"
    fired = await live.until_slack(about("PayguardCleanupJobStale"), "Slack hears of the stale job")
    assert_announced(live, fired, "PayguardCleanupJobStale", WARNINGS)


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
