"""The operator's own writes to Kubernetes (lightkube): mirrors, their status and labels, Events.

Kopf drives the handlers; these calls are for what happens outside them (the retry driver and
the resync). A resource is a plain dict here, as Kopf hands them to handlers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube import ConfigError as LightkubeConfigError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Event
from lightkube.types import PatchType

from app.config import ConfigError
from app.failures.service import Mirror
from payguard_operator import resources as fo

FailedOperation = create_namespaced_resource(fo.GROUP, fo.VERSION, fo.KIND, fo.PLURAL)
COMPONENT = "payguard-operator"


def _plain(resource: Any) -> dict[str, Any]:
    plain: dict[str, Any] = resource.to_dict()
    return plain


def _missing(exc: ApiError) -> bool:
    return exc.status.code == 404


def kube_config() -> KubeConfig:
    """The cluster to use; none is a configuration error (one line, exit 2), not a traceback."""
    try:
        return KubeConfig.from_env()
    except LightkubeConfigError as exc:
        raise ConfigError(f"no Kubernetes cluster: not in a pod, and no usable KUBECONFIG ({exc})") from None


class Kube:
    def __init__(self, client: AsyncClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    @classmethod
    def connect(cls, namespace: str | None) -> Kube:
        """In a pod, its service account and namespace; elsewhere KUBECONFIG's current context."""
        config = kube_config()
        context = config.get()
        return cls(AsyncClient(config=config), namespace or (context.namespace if context else "default"))

    async def close(self) -> None:
        await self.client.close()

    async def list(self) -> list[dict[str, Any]]:
        found = self.client.list(FailedOperation, namespace=self.namespace)
        return [_plain(item) async for item in found]

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            return _plain(await self.client.get(FailedOperation, name, namespace=self.namespace))
        except ApiError as exc:
            if _missing(exc):
                return None
            raise

    async def create(self, mirror: Mirror) -> dict[str, Any]:
        """The row's resource; if it exists already (another replica, a retry), that one."""
        body = fo.new_resource(mirror, self.namespace)
        try:
            made = await self.client.create(FailedOperation.from_dict(body))
        except ApiError as exc:
            if exc.status.code != 409:
                raise
            existing = await self.get(body["metadata"]["name"])
            if existing is None:
                raise
            return existing
        return _plain(made)

    async def write(self, body: dict[str, Any], status: dict[str, Any], labels: dict[str, str]) -> None:
        """Status through the status subresource, then labels if they moved; a vanished resource is fine."""
        name = body["metadata"]["name"]
        try:
            await self.client.patch(
                FailedOperation.Status,
                name,
                {"status": status},
                namespace=self.namespace,
                patch_type=PatchType.MERGE,
            )
            if any((body["metadata"].get("labels") or {}).get(k) != v for k, v in labels.items()):
                await self.client.patch(
                    FailedOperation,
                    name,
                    {"metadata": {"labels": labels}},
                    namespace=self.namespace,
                    patch_type=PatchType.MERGE,
                )
        except ApiError as exc:
            if not _missing(exc):
                raise

    async def remove_annotation(self, name: str, key: str) -> None:
        await self.client.patch(
            FailedOperation,
            name,
            {"metadata": {"annotations": {key: None}}},
            namespace=self.namespace,
            patch_type=PatchType.MERGE,
        )

    async def delete(self, name: str) -> None:
        try:
            await self.client.delete(FailedOperation, name, namespace=self.namespace)
        except ApiError as exc:
            if not _missing(exc):
                raise

    async def post_event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on the resource, as `kubectl describe fo` shows them."""
        meta = body["metadata"]
        now = datetime.now(UTC)
        event = Event(
            metadata=ObjectMeta(generateName=f"{meta['name']}.", namespace=self.namespace),
            involvedObject=ObjectReference(
                apiVersion=f"{fo.GROUP}/{fo.VERSION}",
                kind=fo.KIND,
                name=meta["name"],
                namespace=self.namespace,
                uid=meta.get("uid"),
                resourceVersion=meta.get("resourceVersion"),
            ),
            reason=reason,
            message=message[:1024],
            type=kind,
            count=1,
            firstTimestamp=now,
            lastTimestamp=now,
            source=EventSource(component=COMPONENT),
            reportingComponent=COMPONENT,
        )
        await self.client.create(event)
