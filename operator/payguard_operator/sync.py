"""Keep FailedOperation resources in step with their rows; the rows are the record.

- after every attempt the driver makes: the resource's status, and an Event;
- at every resync, and when a failure is recorded (its NOTIFY): a resource for every pending,
  retrying or dead row that has none (made, or deleted behind the operator's back), every status
  brought up to date, and succeeded or discarded resources deleted once past their TTL.
Writing a status twice is harmless, so a crash anywhere here loses nothing: the next pass redoes it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from app.failures.models import FailureStatus
from app.failures.service import Mirror, mirrors
from app.observability.metrics import WorkOutcome
from app.services import Services
from app.worker.leases import FENCED, Claimed
from payguard_operator import resources as fo
from payguard_operator.kube import Kube

log = logging.getLogger("payguard.operator")

NORMAL, WARNING = "Normal", "Warning"


async def show(kube: Kube, body: dict[str, Any], mirror: Mirror | None) -> bool:
    """Write the status (and labels) the row gives the resource, if they differ; say whether it wrote."""
    status = fo.status_of(mirror, body, datetime.now(UTC))
    labels = fo.labels(mirror) if mirror is not None and fo.mirrors_row(body, mirror) else {}
    have = body["metadata"].get("labels") or {}
    if not fo.status_changed(body, status) and all(have.get(k) == v for k, v in labels.items()):
        return False
    await kube.write(body, status, labels)
    return True


async def mirror_of(services: Services, row_id: Any) -> Mirror | None:
    if not isinstance(row_id, int) or isinstance(row_id, bool):
        return None
    found = await mirrors(services, [row_id], needing=False)
    return found[0] if found else None


def _events(mirror: Mirror, outcome: str) -> list[tuple[str, str, str]]:
    tries = f"attempt {mirror.attempts} of {mirror.max_attempts}"
    if outcome == WorkOutcome.DONE:
        return [(NORMAL, "Succeeded", f"{tries} succeeded")]
    failed = (WARNING, "RetryFailed", f"{tries} failed: {mirror.last_error}")
    if mirror.status == FailureStatus.DEAD:
        return [failed, (WARNING, "Dead", f"gave up after {mirror.attempts} attempts; the row is dead")]
    return [failed]


async def after_attempt(services: Services, kube: Kube, item: Claimed, outcome: str) -> None:
    """The driver's hook: the attempt is committed; show it on the resource (made if missing)."""
    if outcome == FENCED:  # another driver took it over and will say what happened
        return
    mirror = await mirror_of(services, item.id)
    if mirror is None:
        return
    body = await kube.get(fo.resource_name(mirror.kind, mirror.id))
    if body is None:
        if mirror.status not in fo.MIRRORED:
            return
        body = await kube.create(mirror)
    await show(kube, body, mirror)
    for kind, reason, message in _events(mirror, outcome):
        await kube.post_event(body, kind, reason, message)


async def resync(services: Services, kube: Kube) -> dict[str, int]:
    """One pass over every resource and every row that needs one; returns what it did."""
    bodies = await kube.list()
    ids = [b["spec"]["rowId"] for b in bodies if isinstance((b.get("spec") or {}).get("rowId"), int)]
    rows = {m.id: m for m in await mirrors(services, ids, needing=True)}
    done = {"created": 0, "updated": 0, "deleted": 0}
    seen: set[int] = set()
    for body in bodies:
        row_id = (body.get("spec") or {}).get("rowId")
        mirror = rows.get(row_id) if isinstance(row_id, int) else None
        if mirror is not None and fo.mirrors_row(body, mirror):
            seen.add(mirror.id)
            if mirror.expired:
                await kube.delete(body["metadata"]["name"])
                done["deleted"] += 1
                continue
        if await show(kube, body, mirror):
            done["updated"] += 1
    for mirror in rows.values():
        if mirror.id not in seen and mirror.status in fo.MIRRORED:
            await show(kube, await kube.create(mirror), mirror)
            done["created"] += 1
    if any(done.values()):
        log.info("resynced", extra={"resync": done})
    return done
