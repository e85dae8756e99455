"""Every job by name, and how often `serve` runs it in-process."""

from __future__ import annotations

from app.config import Settings
from app.jobs.cleanup import CLEANUP
from app.jobs.health import HEALTH
from app.jobs.models import JobName
from app.jobs.reconcile import RECONCILE
from app.jobs.service import Job

JOBS: dict[JobName, Job] = {job.name: job for job in (CLEANUP, HEALTH, RECONCILE)}


def interval_s(settings: Settings, job: JobName) -> float:
    return {
        JobName.CLEANUP: settings.cleanup_interval_s,
        JobName.HEALTH: settings.health_interval_s,
        JobName.RECONCILE: settings.reconcile_interval_s,
    }[job]
