"""The FailedOperation CRD: its schema takes what the operator writes and refuses the rest, and kubectl
and lightkube read and write the resource the way an on-call engineer and the operator will."""

from __future__ import annotations

import asyncio
import copy
import datetime
import functools
import json
import re
import subprocess
from typing import Any

import jsonschema
import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.types import PatchType

from app.failures.models import FailureStatus
from app.failures.service import MIRROR_ERROR_CHARS, Mirror, shown_error
from payguard_operator import resources
from tests.fixtures.crd_schema import crd_validator
from tests.fixtures.kube import NAMESPACE, KubeAPI, load_crd
from tests.fixtures.tools import kube_tools

Body = dict[str, Any]
DELETE = object()  # a sample change that removes the field
COLUMNS = ["NAME", "KIND", "PHASE", "ATTEMPTS", "MAX", "NEXT ATTEMPT", "LAST ERROR", "AGE"]
OBJECT_META = {"name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion", "labels"}

MINIMAL: Body = {
    "apiVersion": "payguard.dev/v1",
    "kind": "FailedOperation",
    "metadata": {"name": "email-41", "namespace": NAMESPACE},
    "spec": {"kind": "email", "reference": "ob_41", "rowId": 41, "maxAttempts": 4},
}
FULL: Body = {
    **MINIMAL,
    "spec": {**MINIMAL["spec"], "suspend": False},
    "status": {
        "phase": "Retrying",
        "attempts": 2,
        "maxAttempts": 4,
        "nextAttemptAt": "2026-11-26T15:30:00Z",
        "lastError": "SMTP 451 4.7.1 try again later",
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Synced",
                "status": "True",
                "reason": "RowMirrored",
                "message": "failed_operations row 41 mirrored",
                "lastTransitionTime": "2026-11-26T15:00:00Z",
                "observedGeneration": 1,
            }
        ],
    },
}


def version() -> Body:
    served: Body
    (served,) = load_crd()["spec"]["versions"]
    return served


@functools.cache
def validator() -> jsonschema.Draft7Validator:
    return crd_validator(load_crd(), "v1")


def changed(sample: Body, path: tuple[str | int, ...], value: object) -> Body:
    doc = copy.deepcopy(sample)
    parent: Any = doc
    for step in path[:-1]:
        parent = parent[step]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def problems(doc: Body) -> list[tuple[tuple[str | int, ...], str]]:
    return sorted(
        (tuple(error.absolute_path), str(error.validator)) for error in validator().iter_errors(doc)
    )


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(MINIMAL, id="minimal"),
        pytest.param(FULL, id="full-status"),
        pytest.param(changed(FULL, ("status", "nextAttemptAt"), None), id="next-attempt-null"),
        pytest.param(changed(FULL, ("status", "lastError"), "x" * 256), id="last-error-of-256"),
        pytest.param(changed(FULL, ("status", "lastError"), None), id="last-error-null"),
        pytest.param(changed(MINIMAL, ("spec", "kind"), "refund_shortfall"), id="refund-shortfall"),
    ],
)
def test_the_schema_accepts_what_the_operator_writes(doc: Body) -> None:
    assert problems(doc) == []


@pytest.mark.parametrize(
    ("path", "value", "where", "rule"),
    [
        pytest.param(("status", "phase"), "Waiting", ("status", "phase"), "enum", id="unknown-phase"),
        pytest.param(("status", "attempts"), -1, ("status", "attempts"), "minimum", id="negative-attempts"),
        pytest.param(("spec",), DELETE, (), "required", id="missing-spec"),
        pytest.param(("spec", "kind"), DELETE, ("spec",), "required", id="missing-spec-kind"),
        pytest.param(("spec", "reference"), DELETE, ("spec",), "required", id="missing-spec-reference"),
        pytest.param(("spec", "rowId"), DELETE, ("spec",), "required", id="missing-spec-rowId"),
        pytest.param(("spec", "maxAttempts"), DELETE, ("spec",), "required", id="missing-spec-maxAttempts"),
        pytest.param(("spec", "kind"), "sms", ("spec", "kind"), "enum", id="unknown-operation-kind"),
        pytest.param(("spec", "rowId"), 0, ("spec", "rowId"), "minimum", id="rowId-0"),
        pytest.param(("spec", "maxAttempts"), 0, ("spec", "maxAttempts"), "minimum", id="maxAttempts-0"),
        pytest.param(("spec", "suspend"), "true", ("spec", "suspend"), "type", id="suspend-as-string"),
        pytest.param(("spec", "retryNow"), True, ("spec",), "additionalProperties", id="unknown-spec-field"),
        pytest.param(
            ("status", "retries"), 3, ("status",), "additionalProperties", id="unknown-status-field"
        ),
        pytest.param(
            ("status", "conditions", 0, "reason"),
            DELETE,
            ("status", "conditions", 0),
            "required",
            id="condition-without-reason",
        ),
        pytest.param(
            ("status", "conditions", 0, "status"),
            "maybe",
            ("status", "conditions", 0, "status"),
            "enum",
            id="condition-status-maybe",
        ),
        pytest.param(
            ("status", "lastError"), "x" * 257, ("status", "lastError"), "maxLength", id="last-error-257"
        ),
        pytest.param(
            ("status", "nextAttemptAt"),
            "tomorrow",
            ("status", "nextAttemptAt"),
            "format",
            id="next-attempt-not-a-time",
        ),
    ],
)
def test_the_schema_refuses_a_wrong_field_and_names_it(
    path: tuple[str | int, ...], value: object, where: tuple[str | int, ...], rule: str
) -> None:
    errors = list(validator().iter_errors(changed(FULL, path, value)))
    assert [(tuple(error.absolute_path), error.validator) for error in errors] == [(where, rule)]
    if rule in ("required", "additionalProperties"):  # the object is at fault: its message names the field
        assert repr(path[-1]) in errors[0].message


def test_the_crd_names_a_namespaced_resource_with_a_status_subresource() -> None:
    crd = load_crd()
    assert (crd["apiVersion"], crd["kind"]) == ("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "failedoperations.payguard.dev"
    assert crd["spec"]["group"] == "payguard.dev"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"] == {
        "plural": "failedoperations",
        "singular": "failedoperation",
        "kind": "FailedOperation",
        "listKind": "FailedOperationList",
        "shortNames": ["fo"],
        "categories": ["payguard"],
    }
    served = version()
    assert (served["name"], served["served"], served["storage"]) == ("v1", True, True)
    assert served["subresources"] == {"status": {}}


def test_every_printer_column_reads_a_field_of_the_schema_with_its_type() -> None:
    served = version()
    columns = served["additionalPrinterColumns"]
    assert [column["name"] for column in columns] == [
        "Kind",
        "Phase",
        "Attempts",
        "Max",
        "Next Attempt",
        "Last Error",
        "Age",
    ]
    schema_types = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}
    for column in columns:
        section, *rest = column["jsonPath"].removeprefix(".").split(".")
        if section == "metadata":  # ObjectMeta: the API server's, not in the CRD's schema
            assert rest[0] in OBJECT_META, column
            continue
        node = version()["schema"]["openAPIV3Schema"]["properties"][section]
        for part in rest:
            assert part in node.get("properties", {}), f"{column['name']}: no {part} in {column['jsonPath']}"
            node = node["properties"][part]
        if column["type"] == "date":
            assert (node["type"], node.get("format")) == ("string", "date-time"), column
        else:
            assert node["type"] == schema_types[column["type"]], column


async def kubectl(kube: KubeAPI, *args: str) -> str:
    """The real kubectl (never /usr/bin's); in a thread, as the emulator serves from this event loop."""
    binary = await asyncio.to_thread(kube_tools)
    command = [str(binary / "kubectl"), "--kubeconfig", str(kube.kubeconfig), "-n", NAMESPACE, *args]
    command += ["--cache-dir", str(kube.kubeconfig.parent / "kubectl-cache")]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def table(output: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """kubectl's printed table: the header and the rows by NAME, cut at the header's column starts."""
    header, *lines = output.rstrip().splitlines()
    columns = [(match[0], match.start()) for match in re.finditer(r"\S+(?: \S+)*", header)]
    ends = [start for _, start in columns[1:]] + [None]
    rows = [
        {name: line[start:end].strip() for (name, start), end in zip(columns, ends, strict=True)}
        for line in lines
    ]
    return [name for name, _ in columns], {row["NAME"]: row for row in rows}


def in_minutes(minutes: int) -> str:
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=minutes)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


async def three_operations(kube: KubeAPI, next_attempt_at: str) -> None:
    retrying = changed(MINIMAL, ("status",), {"phase": "Retrying", "attempts": 2, "maxAttempts": 4})
    retrying["status"] |= {"nextAttemptAt": next_attempt_at, "lastError": "SMTP 451 try later"}
    fresh = changed(MINIMAL, ("metadata", "name"), "webhook-42")  # no status written yet
    fresh["spec"] = {"kind": "webhook", "reference": "evt_1Qx", "rowId": 42, "maxAttempts": 8}
    dead = changed(MINIMAL, ("metadata", "name"), "refund-43")
    dead["spec"] = {"kind": "refund_shortfall", "reference": "re_9", "rowId": 43, "maxAttempts": 3}
    dead["status"] = {"phase": "Dead", "attempts": 3, "maxAttempts": 3, "lastError": "card_declined"}
    for body in (retrying, fresh, dead):
        assert problems(body) == [], body["metadata"]["name"]
        await kube.create("failedoperations", body)


async def test_kubectl_get_prints_the_printer_columns(kube: KubeAPI) -> None:
    await three_operations(kube, next_attempt_at=in_minutes(10))

    for args in (["get", "fo"], ["get", "failedoperations.payguard.dev", "-o", "wide"], ["get", "payguard"]):
        header, rows = table(await kubectl(kube, *args))
        assert header == COLUMNS, args
        shown = {
            name: [row[column] for column in ("KIND", "PHASE", "ATTEMPTS", "MAX", "LAST ERROR")]
            for name, row in rows.items()
        }
        assert shown == {
            "email-41": ["email", "Retrying", "2", "4", "SMTP 451 try later"],
            "webhook-42": ["webhook", "", "", "", ""],  # no status yet: empty cells, not an error
            "refund-43": ["refund_shortfall", "Dead", "3", "3", "card_declined"],
        }, args
        assert rows["refund-43"]["NEXT ATTEMPT"] == "", args  # a dead operation has no next attempt
        assert all(re.fullmatch(r"\d+s", row["AGE"]) for row in rows.values()), args


async def test_kubectl_get_shows_when_the_next_attempt_is_due(kube: KubeAPI) -> None:
    due = in_minutes(10)
    await three_operations(kube, next_attempt_at=due)
    _, rows = table(await kubectl(kube, "get", "fo"))
    assert rows["email-41"]["NEXT ATTEMPT"] == due


async def test_kubectl_get_one_as_json_is_the_stored_object(kube: KubeAPI) -> None:
    await three_operations(kube, next_attempt_at=in_minutes(10))
    printed = json.loads(await kubectl(kube, "get", "fo", "email-41", "-o", "json"))
    assert printed == kube.get("failedoperations", NAMESPACE, "email-41")
    assert (printed["apiVersion"], printed["kind"]) == ("payguard.dev/v1", "FailedOperation")
    assert printed["status"]["phase"] == "Retrying"


async def test_lightkube_creates_lists_patches_status_and_deletes(kube: KubeAPI) -> None:
    FailedOperation = create_namespaced_resource("payguard.dev", "v1", "FailedOperation", "failedoperations")
    async with AsyncClient(config=KubeConfig.from_file(kube.kubeconfig)) as client:
        for name, kind, row in [("email-41", "email", 41), ("webhook-42", "webhook", 42)]:
            meta = ObjectMeta(name=name, labels={"payguard.dev/kind": kind})
            spec = {"kind": kind, "reference": f"ref-{row}", "rowId": row, "maxAttempts": 4}
            created = await client.create(FailedOperation(metadata=meta, spec=spec, status={"phase": "Dead"}))
            assert created.metadata.namespace == NAMESPACE and created.metadata.generation == 1
            assert created.status is None  # a create never writes status: only /status does

        async def names(labels: dict[str, str] | None = None) -> list[str]:
            return [fo.metadata.name async for fo in client.list(FailedOperation, labels=labels)]

        assert await names({"payguard.dev/kind": "email"}) == ["email-41"]
        assert await names({"payguard.dev/kind": "sms"}) == []

        status = {"phase": "Retrying", "attempts": 2, "maxAttempts": 4, "lastError": "SMTP 451"}
        patched = await client.patch(
            FailedOperation.Status, "email-41", {"status": status}, patch_type=PatchType.MERGE
        )
        assert patched["status"] == status
        assert patched["metadata"]["generation"] == 1  # status is not the spec: no new generation

        fetched = await client.get(FailedOperation, "email-41")
        assert fetched.status == status and fetched.spec["reference"] == "ref-41"

        await client.delete(FailedOperation, "email-41")
        with pytest.raises(ApiError) as gone:
            await client.get(FailedOperation, "email-41")
        assert gone.value.status.code == 404
        assert await names() == ["webhook-42"]


async def test_writes_keep_the_api_servers_rules(kube: KubeAPI) -> None:
    """What Kopf relies on: /status and the main resource write their own halves, versions move, a stale
    JSON patch is refused with 422."""
    FailedOperation = create_namespaced_resource("payguard.dev", "v1", "FailedOperation", "failedoperations")
    async with AsyncClient(config=KubeConfig.from_file(kube.kubeconfig)) as client:
        created = await client.create(
            FailedOperation(metadata=ObjectMeta(name="email-41"), spec=MINIMAL["spec"])
        )
        first = created.metadata.resourceVersion

        change = {"spec": {"suspend": True}, "status": {"phase": "Dead"}}
        body = await client.patch(FailedOperation, "email-41", change, patch_type=PatchType.MERGE)
        assert body.spec["suspend"] is True and body.status is None  # the main resource cannot write status
        assert body.metadata.generation == 2 and int(body.metadata.resourceVersion) > int(first)

        change = {"spec": {"suspend": False}, "status": {"phase": "Retrying"}}
        body = await client.patch(FailedOperation.Status, "email-41", change, patch_type=PatchType.MERGE)
        assert body["spec"]["suspend"] is True  # /status writes status and nothing else
        assert body["status"] == {"phase": "Retrying"}

        stale = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": first},
            {"op": "add", "path": "/metadata/finalizers", "value": ["payguard.dev/mirror"]},
        ]
        with pytest.raises(ApiError) as refused:
            await client.patch(FailedOperation, "email-41", stale, patch_type=PatchType.JSON)
        assert refused.value.status.code == 422
        assert "finalizers" not in kube.get("failedoperations", NAMESPACE, "email-41")["metadata"]


async def test_a_watch_resumes_after_its_resource_version(kube: KubeAPI) -> None:
    """Kopf and kubectl list, then watch from the list's resourceVersion: they must get what came after."""
    FailedOperation = create_namespaced_resource("payguard.dev", "v1", "FailedOperation", "failedoperations")

    def labelled(name: str, kind: str) -> Any:
        meta = ObjectMeta(name=name, labels={"payguard.dev/kind": kind})
        return FailedOperation(metadata=meta, spec={**MINIMAL["spec"], "kind": kind})

    async with AsyncClient(config=KubeConfig.from_file(kube.kubeconfig)) as client:
        since = (await client.create(labelled("email-41", "email"))).metadata.resourceVersion
        await client.create(labelled("webhook-42", "webhook"))
        await client.patch(
            FailedOperation, "email-41", {"spec": {"suspend": True}}, patch_type=PatchType.MERGE
        )

        seen: list[tuple[str, str, bool]] = []
        caught_up = asyncio.Event()

        async def watch() -> None:
            emails = client.watch(
                FailedOperation, labels={"payguard.dev/kind": "email"}, resource_version=since
            )
            async for change, fo in emails:
                seen.append((change, fo.metadata.name, fo.spec.get("suspend")))
                caught_up.set()
                if change == "DELETED":
                    return

        watching = asyncio.create_task(watch())
        await asyncio.wait_for(caught_up.wait(), 5)
        await client.delete(FailedOperation, "email-41")
        await asyncio.wait_for(watching, 5)
    assert seen == [("MODIFIED", "email-41", True), ("DELETED", "email-41", True)]


def _mirror(**changes: Any) -> Mirror:
    fields: dict[str, Any] = {
        "id": 41,
        "kind": "email",
        "reference": "41",
        "status": FailureStatus.RETRYING,
        "attempts": 2,
        "max_attempts": 4,
        "next_attempt_at": datetime.datetime(2026, 11, 26, 15, 30, tzinfo=datetime.UTC),
        "last_error": "SMTP 451 4.3.0 try again later",
        "suspended": False,
        "expired": False,
    }
    return Mirror(**{**fields, **changes})


@pytest.mark.parametrize(
    "mirror",
    [
        _mirror(),
        _mirror(status=FailureStatus.PENDING, attempts=1, suspended=True),
        _mirror(status=FailureStatus.SUCCEEDED, attempts=3, next_attempt_at=None, last_error=None),
        _mirror(status=FailureStatus.DEAD, attempts=4, next_attempt_at=None),
        _mirror(status=FailureStatus.DISCARDED, next_attempt_at=None),
        None,  # a resource whose row is gone
    ],
    ids=["retrying", "suspended", "succeeded", "dead", "discarded", "no-row"],
)
def test_what_the_operator_writes_is_valid_for_the_crd(mirror: Mirror | None) -> None:
    made = resources.new_resource(mirror or _mirror(), NAMESPACE)
    made["metadata"]["generation"] = 1
    made["status"] = resources.status_of(mirror, made, datetime.datetime.now(datetime.UTC))
    assert problems(made) == []
    # a second write keeps each condition's transition time
    again = resources.status_of(
        mirror, made, datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    )
    assert not resources.status_changed(made, again)


def test_a_shown_error_has_no_address_or_secret_and_fits_the_column() -> None:
    error = "SMTP 550 5.1.1 <jane.doe@example.com>: no such user; key sk_live_abc123 " + "x" * 500
    shown = shown_error(error)
    assert shown is not None
    assert "example.com" not in shown and "sk_live_abc123" not in shown
    assert len(shown) == MIRROR_ERROR_CHARS
    assert problems({**MINIMAL, "status": {"lastError": shown}}) == []
