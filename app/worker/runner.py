"""The worker loop: claim a batch, handle it, repeat; sleep until a NOTIFY or the poll interval.

One loop per queue (webhook events, outbox emails, and failed operations when the retry
driver is local). Every claim is a lease (app/worker/leases.py), so any number of
workers, in `payguard worker` processes or inside `payguard serve`, share the work.
A loop claims only what it starts at once; on stop, it claims nothing more and
finishes the items it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import TextClause
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.failures import service as failures
from app.notifications import tasks as emails
from app.observability.metrics import Queue, WorkOutcome
from app.services import Services
from app.webhooks import tasks as events
from app.worker.leases import WORK_CHANNEL, Claimed, claim

log = logging.getLogger("payguard.worker")

# events per transaction: a batch's effects are applied set by set (app/webhooks/tasks.py)
EVENTS_PER_TRANSACTION = 100
Handle = Callable[[Services, list[Claimed]], Awaitable[object]]
AfterRetry = Callable[[Claimed, str], Awaitable[None]]  # (item, outcome): the operator mirrors it


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
        """Claim nothing more; `run` returns once the items in hand are finished."""
        self._stopping.set()
        for wake in self._wake.values():
            wake.set()

    def wake(self, queue: Queue) -> None:
        self._wake[queue].set()

    async def run(self) -> None:
        settings = self.services.settings
        loops: list[Awaitable[None]] = [
            # events a batch per transaction (one that fails falls back to one event at a time)
            self._drain(Queue.WEBHOOK_EVENTS, events.CLAIM, events.handle_events, EVENTS_PER_TRANSACTION),
            self._emails(),
        ]
        if settings.retry_driver == "local":  # otherwise the operator drives the retries
            loops.append(self._retries(None))
        await self._listening(loops)
        log.info("worker stopped")

    async def drive_retries(self, after: AfterRetry) -> None:
        """The failed operations' queue alone, `after` told of each attempt: the operator's driver."""
        await self._listening([self._retries(after)])

    def _retries(self, after: AfterRetry | None) -> Awaitable[None]:
        async def retry(services: Services, item: Claimed) -> str:
            outcome = await failures.run_retry(services, item)
            if after is not None:
                await after(item, outcome)
            return outcome

        return self._drain(Queue.RETRIES, failures.CLAIM, one_at_a_time(retry))

    async def _listening(self, loops: list[Awaitable[None]]) -> None:
        listener = asyncio.create_task(self._listen())
        try:
            await asyncio.gather(*loops)
        finally:
            # on stop the listener ends itself: a cancel mid-UNLISTEN would pool a connection owing a Sync
            if not self._stopping.is_set():
                listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

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
        await self._drain(Queue.OUTBOX, emails.CLAIM, one_at_a_time(emails.send_email))

    async def _drain(self, queue: Queue, statement: TextClause, handle: Handle, per_task: int = 1) -> None:
        """One claimer per queue: it claims only what its free slots start at once (`per_task` items
        each, up to the batch size), so nothing it holds waits unstarted while its lease runs out.
        Up to `worker_concurrency` tasks run at once; on stop, those running finish."""
        settings = self.services.settings
        free = settings.worker_concurrency
        freed = asyncio.Event()
        running: set[asyncio.Task[None]] = set()

        async def attempt(items: list[Claimed]) -> None:
            nonlocal free
            outcomes: object = None
            try:
                outcomes = await handle(self.services, items)
            except Exception as exc:  # their leases expire and another claim retries them
                log.warning("attempt failed: %r", exc, extra={"queue": queue, "ids": [i.id for i in items]})
            finally:
                free += 1
                freed.set()
            if queue == Queue.WEBHOOK_EVENTS:
                self.wake(Queue.WEBHOOK_EVENTS)  # the next events about the same objects are due
                if isinstance(outcomes, list) and WorkOutcome.DONE in outcomes:
                    self.wake(Queue.OUTBOX)  # granted payments queued receipts

        # the claims' own connection (no checkout and ping per claim), opened again if it fails
        conn: AsyncConnection | None = None
        try:
            while not self._stopping.is_set():
                if free == 0:
                    await freed.wait()
                    freed.clear()
                    continue
                wanted = min(settings.worker_batch_size, free * per_task)
                try:
                    conn = conn or await self.engine.connect()
                    items = await claim(conn, statement, queue, batch=wanted, lease_s=settings.worker_lease_s)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    log.warning("claim failed", extra={"queue": queue, "error": error})
                    await _closed(conn)
                    conn = None
                    await self._sleep(queue)
                    continue
                for i in range(0, len(items), per_task):
                    free -= 1
                    task = asyncio.create_task(attempt(items[i : i + per_task]))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if len(items) < wanted:  # nothing more is due: until a NOTIFY, a finished task or the poll
                    await self._sleep(queue)
            await asyncio.gather(*running)
        finally:
            await _closed(conn)

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
                with contextlib.suppress(TimeoutError):  # a stop cuts the wait short
                    await asyncio.wait_for(
                        self._stopping.wait(), self.services.settings.worker_poll_interval_s
                    )


async def _closed(conn: AsyncConnection | None) -> None:
    """Close a claim connection, broken or not."""
    if conn is not None:
        with contextlib.suppress(Exception):
            await conn.close()
