"""The jobs on their schedule inside `payguard serve` (PAYGUARD_RUN_JOBS), for the embedded default.

Each job's loop asks the database when the job last ran (in any process: replicas and CronJobs
count too) and runs it once its interval has passed; the advisory lock keeps runs of one job from
overlapping. Where CronJobs run the jobs, turn this off.
"""

from __future__ import annotations

import asyncio
import logging

from app.jobs.models import JobName
from app.jobs.registry import JOBS, interval_s
from app.jobs.service import describe, run_job, seconds_until_due
from app.services import Services

log = logging.getLogger("payguard.jobs")


class JobScheduler:
    def __init__(self, services: Services) -> None:
        self.services = services
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for name in JOBS:
            if name == JobName.RECONCILE and not self.services.payments.configured:
                log.info("reconcile not scheduled: STRIPE_SECRET_KEY is not set")
                continue
            self._tasks.append(asyncio.create_task(self._every(name)))

    async def stop(self) -> None:
        """Cancel the loops; a run cut short records itself as failed (or is closed as abandoned later)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _every(self, name: JobName) -> None:
        interval = interval_s(self.services.settings, name)
        while True:
            try:
                wait = await seconds_until_due(self.services, name, interval)
                if wait <= 0:
                    await run_job(self.services, JOBS[name])
                    continue
            except Exception as exc:  # the database is away: look again after a while
                log.warning("scheduled job could not run", extra={"job": name, "error": describe(exc)})
                wait = interval
            await asyncio.sleep(wait)
