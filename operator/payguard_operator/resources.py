"""FailedOperation resources as plain data: a row's mirror in, a resource's body and status out.

No I/O here, so what a resource shows is tested without Kubernetes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from app.failures.models import FailureStatus
from app.failures.service import Mirror

GROUP, VERSION, PLURAL, KIND = "payguard.dev", "v1", "failedoperations", "FailedOperation"
RETRY_NOW = "payguard.dev/retry-now"  # an annotation: attempt at once, then it is removed
FINALIZER = "payguard.dev/discard-on-delete"
LABEL_KIND, LABEL_STATUS, LABEL_ROW = "payguard.dev/kind", "payguard.dev/status", "payguard.dev/row-id"
MANAGED_BY = {"app.kubernetes.io/managed-by": "payguard-operator", "app.kubernetes.io/part-of": "payguard"}

PHASES = {
    FailureStatus.PENDING: "Pending",
    FailureStatus.RETRYING: "Retrying",
    FailureStatus.SUCCEEDED: "Succeeded",
    FailureStatus.DEAD: "Dead",
    FailureStatus.DISCARDED: "Discarded",
}
# the rows a resource is kept for (recreated if deleted behind the operator's back)
MIRRORED = (FailureStatus.PENDING, FailureStatus.RETRYING, FailureStatus.DEAD)


def resource_name(kind: str, row_id: int) -> str:
    """`email-42`: unique per database, and one payguard database per namespace."""
    return f"{kind.replace('_', '-')}-{row_id}"


def labels(mirror: Mirror) -> dict[str, str]:
    return {
        **MANAGED_BY,
        LABEL_KIND: mirror.kind,
        LABEL_STATUS: mirror.status.value,
        LABEL_ROW: str(mirror.id),
    }


def new_resource(mirror: Mirror, namespace: str) -> dict[str, Any]:
    """The resource of a row; its status is written after (the API server ignores it on create)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": resource_name(mirror.kind, mirror.id),
            "namespace": namespace,
            "labels": labels(mirror),
        },
        "spec": {
            "kind": mirror.kind,
            "reference": mirror.reference,
            "rowId": mirror.id,
            "maxAttempts": mirror.max_attempts,
            "suspend": mirror.suspended,
        },
    }


def mirrors_row(body: dict[str, Any], mirror: Mirror) -> bool:
    """The resource names this very row: a hand-made resource cannot act on another operation."""
    spec = body.get("spec") or {}
    return bool(
        spec.get("rowId") == mirror.id
        and spec.get("kind") == mirror.kind
        and spec.get("reference") == mirror.reference
    )


def _stamp(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(
    previous: list[dict[str, Any]], kind: str, true: bool, reason: str, message: str, now: datetime
) -> dict[str, Any]:
    """A condition; its lastTransitionTime moves only when its status does."""
    status = "True" if true else "False"
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status else _stamp(now)
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}


def status_of(mirror: Mirror | None, body: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The status a resource should show: its row's, or Synced=False when it mirrors no row of ours."""
    previous = (body.get("status") or {}).get("conditions") or []
    generation = (body.get("metadata") or {}).get("generation", 0)
    if mirror is None or not mirrors_row(body, mirror):
        missing = _condition(
            previous, "Synced", False, "RowMissing", "no failed operation of this kind, reference and id", now
        )
        return {"observedGeneration": generation, "conditions": [missing]}
    phase = PHASES[mirror.status]
    if mirror.suspended and mirror.status in MIRRORED:
        suspended_msg = "no attempt starts until spec.suspend is false"
    else:
        suspended_msg = "attempts run on the backoff schedule"
    conditions = [
        _condition(previous, "Synced", True, "RowFound", f"mirrors failed operation {mirror.id}", now),
        _condition(
            previous,
            "Succeeded",
            mirror.status == FailureStatus.SUCCEEDED,
            phase,
            f"attempt {mirror.attempts} of {mirror.max_attempts}",
            now,
        ),
        _condition(
            previous,
            "Suspended",
            mirror.suspended,
            "Suspended" if mirror.suspended else "Running",
            suspended_msg,
            now,
        ),
    ]
    return {
        "phase": phase,
        "attempts": mirror.attempts,
        "maxAttempts": mirror.max_attempts,
        "nextAttemptAt": _stamp(mirror.next_attempt_at),
        "lastError": mirror.last_error,
        "observedGeneration": generation,
        "conditions": conditions,
    }


def status_changed(body: dict[str, Any], status: dict[str, Any]) -> bool:
    current = body.get("status") or {}
    return any(current.get(key) != value for key, value in status.items())
