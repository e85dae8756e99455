"""The worker loop: claim a batch, handle it, repeat; sleep until a NOTIFY or the poll interval.

One loop per queue (webhook events, outbox emails, and failed operations when the retry
driver is local). Every claim is a lease (app/worker/leases.py), so any number of
workers, in `payguard worker` processes or inside `payguard serve`, share the work.
On stop, a loop claims nothing more, finishes the items it has started and gives
back the leases of those it has not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.failures import service as failures
from app.notifications import tasks as emails
from app.observability.metrics import Queue
from app.services import Services
from app.webhooks import tasks as events
from app.worker.leases import WORK_CHANNEL, Claimed, release_statement

log = logging.getLogger("payguard.worker")

# items per transaction: a chunk that fails is redone one by one, and a stop gives back the rest
MAX_CHUNK = 10
Claim = Callable[[Services, int], Awaitable[list[Claimed]]]
Handle = Callable[[Services, list[Claimed]], Awaitable[object]]


def one_at_a_time(handle: Callable[[Services, Claimed], Awaitable[str]]) -> Handle:
    async def each(services: Services, items: list[Claimed]) -> None:
        for item in items:
            await handle(services, item)

    return each


class Worker:
    def __init__(self, services: Services, engine: AsyncEngine) -> None:
        self.services = services
        self.engine = engine
        self._stopping = asyncio.Event()
        self._wake = {queue: asyncio.Event() for queue in Queue}

    def stop(self) -> None:
        """Claim nothing more; `run` returns once the items in hand are finished or given back."""
        self._stopping.set()
        for wake in self._wake.values():
            wake.set()

    def wake(self, queue: Queue) -> None:
        self._wake[queue].set()

    async def run(self) -> None:
        settings = self.services.settings
        loops = [
            # events in chunks, each chunk one transaction (it falls back to one event at a time)
            self._drain(
                Queue.WEBHOOK_EVENTS,
                "webhook_events",
                events.claim_due_events,
                events.handle_events,
                chunked=True,
            ),
            self._emails(),
        ]
        if settings.retry_driver == "local":  # otherwise the operator drives the retries
            loops.append(
                self._drain(
                    Queue.RETRIES,
                    "failed_operations",
                    failures.claim_due_retries,
                    one_at_a_time(failures.run_retry),
                )
            )
        listener = asyncio.create_task(self._listen())
        try:
            await asyncio.gather(*loops)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        log.info("worker stopped")

    async def _emails(self) -> None:
        settings = self.services.settings
        if settings.smtp_host is None:  # nothing can be sent: keep them, visibly
            while not self._stopping.is_set():
                try:
                    await emails.hold_emails(self.services, settings.worker_batch_size)
                except Exception:
                    log.exception("holding emails failed")
                await self._sleep(Queue.OUTBOX)
            return
        # a batch no larger than what is sent at once: every lease is acted on long before it expires
        batch = min(settings.worker_batch_size, settings.worker_concurrency)
        await self._drain(
            Queue.OUTBOX, "outbox_emails", emails.claim_due_emails, one_at_a_time(emails.send_email), batch
        )

    async def _drain(
        self, queue: Queue, table: str, claim: Claim, handle: Handle, batch: int = 0, chunked: bool = False
    ) -> None:
        settings = self.services.settings
        batch = batch or settings.worker_batch_size
        slots = asyncio.Semaphore(settings.worker_concurrency)
        release = release_statement(table)
        while not self._stopping.is_set():
            try:
                items = await claim(self.services, batch)
            except Exception as exc:
                log.warning("claim failed", extra={"queue": queue, "error": f"{type(exc).__name__}: {exc}"})
                await self._sleep(queue)
                continue
            if not items:
                await self._sleep(queue)
                continue
            # an item not started while its lease is young is left to the next claim, not run late
            deadline = time.monotonic() + settings.worker_lease_s / 2
            unstarted: list[Claimed] = []
            # `concurrency` chunks at once; one item per chunk unless the queue handles chunks together
            size = min(MAX_CHUNK, -(-len(items) // settings.worker_concurrency)) if chunked else 1
            chunks = [items[i : i + size] for i in range(0, len(items), size)]
            await asyncio.gather(
                *(self._attempt(queue, handle, chunk, slots, deadline, unstarted) for chunk in chunks)
            )
            if queue == Queue.WEBHOOK_EVENTS:
                self.wake(Queue.OUTBOX)  # handled payments may have queued receipts
            if unstarted:
                await self._release(release, unstarted)

    async def _attempt(
        self,
        queue: Queue,
        handle: Handle,
        chunk: list[Claimed],
        slots: asyncio.Semaphore,
        deadline: float,
        unstarted: list[Claimed],
    ) -> None:
        async with slots:
            if self._stopping.is_set() or time.monotonic() > deadline:
                unstarted.extend(chunk)
                return
            try:
                await handle(self.services, chunk)
            except Exception as exc:  # their leases expire and another claim retries them
                log.warning("attempt failed: %r", exc, extra={"queue": queue, "ids": [i.id for i in chunk]})

    async def _release(self, statement: Any, items: list[Claimed]) -> None:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    statement, {"ids": [i.id for i in items], "tokens": [i.token for i in items]}
                )
        except Exception as exc:  # the leases expire instead
            log.warning("release failed", extra={"error": repr(exc)})

    async def _sleep(self, queue: Queue) -> None:
        wake = self._wake[queue]
        try:
            await asyncio.wait_for(wake.wait(), self.services.settings.worker_poll_interval_s)
        except TimeoutError:
            pass
        wake.clear()

    async def _listen(self) -> None:
        """LISTEN on one connection; if it is lost, polling carries on until it is back."""
        queues = {
            "webhook_events": Queue.WEBHOOK_EVENTS,
            "failed_operations": Queue.RETRIES,
            "outbox": Queue.OUTBOX,
        }

        def notified(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            if payload in queues:
                self.wake(queues[payload])

        while not self._stopping.is_set():
            try:
                async with self.engine.connect() as conn:
                    raw: Any = (await conn.get_raw_connection()).driver_connection
                    await raw.add_listener(WORK_CHANNEL, notified)
                    try:
                        while not self._stopping.is_set() and not raw.is_closed():
                            with contextlib.suppress(TimeoutError):  # look at the connection every second
                                await asyncio.wait_for(self._stopping.wait(), 1.0)
                    finally:
                        if not raw.is_closed():
                            await raw.remove_listener(WORK_CHANNEL, notified)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN connection lost; polling", extra={"error": repr(exc)})
                await asyncio.sleep(self.services.settings.worker_poll_interval_s)
