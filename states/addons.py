"""addons: server-side applies every object of the `*.yaml` manifests in `config.addons.manifests_dir`
(field manager `lifecycle`; `${IMAGE_REPOSITORY}`, `${STORAGE_PROVISIONER_IMAGE}` and `${STORAGE_HELPER_IMAGE}`
substituted from the config), then waits for their Deployments and DaemonSets.
Done when every object exists, those workloads are available and exactly one StorageClass is the default
(local-path, deploy/addons).
On a start after a stop the objects are kept in etcd: done when they are all there as their manifests say and no
workload's pods are in a hopeless state; their pods come back with the kubelet, and their availability (the
provisioner's readiness probe waits 5 s on a real node) is not waited for (docs/protocol.md, Stop and start).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lifecycle import yamlsafe
from lifecycle.config import Config
from lifecycle.errors import PermanentError, StepError, TemporaryError
from lifecycle.ports import KubeApi, KubeApiError
from lifecycle.step import StepContext, fail_at
from states.readiness import HOPELESS_REASONS, labels_match, pods_summary

FIELD_MANAGER = "lifecycle"
START_JOB = "start"  # lifecycle.engine's job kind for a start after a stop
WORKLOAD_KINDS = frozenset({("apps/v1", "Deployment"), ("apps/v1", "DaemonSet")})
STORAGE_CLASS = ("storage.k8s.io/v1", "StorageClass")
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# One GET per pending workload on the local API: cheap, and each poll period is time added to `running` (a
# start's wait for the storage provisioner, issue 10).
_POLL_S = 0.1
# How long a start lets pods show a hopeless reason (CrashLoopBackOff...) before it fails on them: longer than
# a kubelet's first back-off (10 s), shorter than its longest (5 min).
HOPELESS_GRACE_S = 30.0


@dataclass(frozen=True)
class AddonObject:
    source: str  # "<file> document <n>", for error messages
    body: dict[str, Any]

    @property
    def api_version(self) -> str:
        return str(self.body["apiVersion"])

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str | None:
        ns = self.body["metadata"].get("namespace")
        return str(ns) if ns else None

    def label(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


class Addons:
    """Applies the addon manifests and waits for their workloads to be available."""

    name = "addons"
    timeout_s = 300.0
    retries = 2  # server-side apply is idempotent

    async def is_done(self, ctx: StepContext) -> bool:
        if ctx.job == START_JOB:
            return await _kept(ctx)
        try:
            # In a thread: YAML of any size is parsed off the event loop (issue 11: nothing blocks the loop).
            objects = await asyncio.to_thread(load_manifests, ctx.config.addons.manifests_dir,
                                              placeholders=placeholders(ctx.config))
        except PermanentError:
            return False  # run reports what is wrong with them
        if not ctx.paths.admin_conf.is_file():
            return False
        try:
            async with ctx.ports.kube.connect(ctx.paths.admin_conf) as api:
                for obj in objects:
                    current = await api.get(obj.api_version, obj.kind, obj.name, obj.namespace or "default")
                    if current is None or object_problem(obj, current) is not None:
                        return False
        except KubeApiError:
            return False
        return True

    async def run(self, ctx: StepContext) -> None:
        objects = await asyncio.to_thread(load_manifests, ctx.config.addons.manifests_dir,
                                          placeholders=placeholders(ctx.config))
        try:
            async with ctx.ports.kube.connect(ctx.paths.admin_conf) as api:
                # Every one, also those that exist: an apply puts back what was changed by hand (a ClusterRole
                # that lost a verb), which `is_done` does not look at.
                for index, obj in enumerate(objects, start=1):
                    await _apply(api, obj)
                    ctx.progress(f"applied {obj.label()}", current=index, total=len(objects))
                workloads = [o for o in objects if (o.api_version, o.kind) in WORKLOAD_KINDS]
                if ctx.job == START_JOB:
                    await _wait_not_hopeless(ctx, api=api, workloads=workloads)
                else:
                    await _wait_available(ctx, api=api, workloads=workloads)
        except KubeApiError as exc:
            raise _api_error(exc, doing="talking to the API") from exc

    async def before_retry(self, ctx: StepContext) -> None:
        return None


async def _kept(ctx: StepContext) -> bool:
    """On a start: every object is in the API as its manifest says and no workload's pods are in a state that
    waiting does not cure; their availability is not waited for (their pods come back with the kubelet)."""
    try:
        objects = await asyncio.to_thread(load_manifests, ctx.config.addons.manifests_dir,
                                          placeholders=placeholders(ctx.config))
    except PermanentError:
        return False
    if not ctx.paths.admin_conf.is_file():
        return False
    try:
        async with ctx.ports.kube.connect(ctx.paths.admin_conf) as api:
            if await _to_apply(api, objects):
                return False
            await _not_hopeless(api, [o for o in objects if (o.api_version, o.kind) in WORKLOAD_KINDS])
    except (KubeApiError, StepError):
        return False
    return True


async def _not_hopeless(api: KubeApi, workloads: list[AddonObject]) -> None:
    """PermanentError `not_available` when a workload's pods show a reason waiting does not cure (ErrImagePull,
    CrashLoopBackOff...): a start must not say `running` over a provisioner that cannot come back."""
    for workload in workloads:
        selector = ((workload.body.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not selector:
            continue
        pods = [p for p in await api.list_pods(workload.namespace or "default") if labels_match(selector, p)]
        summary = pods_summary(pods)
        if summary is not None and any(reason in summary for reason in HOPELESS_REASONS):
            raise PermanentError(f"{workload.label()}: pods: {summary}", code="not_available",
                                 details={"workloads": {workload.label(): summary}})


async def _wait_not_hopeless(ctx: StepContext, *, api: KubeApi, workloads: list[AddonObject]) -> None:
    """A start's run: until no workload's pods show a reason waiting does not cure, unless one does for
    HOPELESS_GRACE_S. Right after the kubelet comes back such a reason can be passing: a provisioner that
    crashed while the API server was still starting shows CrashLoopBackOff until its back-off ends (10 s for a
    first crash, pkg/kubelet/kubelet.go backOffPeriod). A start that took the Deployment's last status as
    `available` (written before the stop) failed its outcome check on such a pod 0.2 s later."""
    loop = asyncio.get_running_loop()
    give_up_at = fail_at(ctx)
    first_seen: float | None = None
    while True:
        try:
            await _not_hopeless(api, workloads)
        except PermanentError as exc:
            now = loop.time()
            if first_seen is None:
                first_seen = now
                ctx.progress(f"waiting whether this passes: {exc.message}")
            if now - first_seen >= HOPELESS_GRACE_S or now + _POLL_S >= give_up_at:
                raise
        except KubeApiError:
            pass  # an API restart is waited out, as in _wait_available
        else:
            return
        await asyncio.sleep(_POLL_S)


async def _to_apply(api: KubeApi, objects: list[AddonObject]) -> list[AddonObject]:
    """The objects missing, or live with a problem an apply mends (a StorageClass no longer the default). A
    workload that exists but is not available yet is not among them: its pods come back (a start after a stop)."""
    wanted: list[AddonObject] = []
    for obj in objects:
        try:
            current = await api.get(obj.api_version, obj.kind, obj.name, obj.namespace or "default")
        except KubeApiError as exc:
            raise _api_error(exc, doing=f"reading {obj.label()}") from exc
        if current is None or ((obj.api_version, obj.kind) not in WORKLOAD_KINDS
                               and object_problem(obj, current) is not None):
            wanted.append(obj)
    return wanted


def placeholders(config: Config) -> dict[str, str]:
    """What `${NAME}` in a manifest stands for: the image repository and the addon images of the config."""
    repo = config.kubernetes.image_repository
    return {"IMAGE_REPOSITORY": repo, **config.addons.images(repo)}


def load_manifests(directory: Path, *, placeholders: Mapping[str, str]) -> list[AddonObject]:
    """Every document of every `*.yaml` in `directory` (sorted by file name), validated; nothing is applied."""
    if not directory.is_dir():
        raise PermanentError(f"addons.manifests_dir {directory} is not a directory", code="bad_manifest")
    objects: list[AddonObject] = []
    for path in sorted(directory.glob("*.yaml")):
        text = path.read_text()
        unknown = sorted({m.group(0) for m in _PLACEHOLDER.finditer(text) if m.group(1) not in placeholders})
        if unknown:
            known = ", ".join(f"${{{name}}}" for name in sorted(placeholders))
            raise PermanentError(f"{path}: unknown placeholder {', '.join(unknown)} (set: {known})",
                                 code="bad_manifest")
        text = _PLACEHOLDER.sub(lambda m: placeholders[m.group(1)], text)
        try:
            documents = list(yamlsafe.load_all(text))
        except yaml.YAMLError as exc:
            raise PermanentError(f"{path}: not valid YAML: {exc}", code="bad_manifest") from exc
        for index, doc in enumerate(documents):
            if doc is None:
                continue  # an empty document (a trailing `---`)
            source = f"{path} document {index}"
            _validate(doc, source=source)
            objects.append(AddonObject(source=source, body=doc))
    return objects


def _validate(doc: object, *, source: str) -> None:
    if not isinstance(doc, dict):
        raise PermanentError(f"{source}: expected a mapping, got {type(doc).__name__}", code="bad_manifest")
    for key in ("apiVersion", "kind"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise PermanentError(f"{source}: missing {key}", code="bad_manifest")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise PermanentError(f"{source}: missing metadata.name", code="bad_manifest")


async def _apply(api: KubeApi, obj: AddonObject) -> None:
    try:
        await api.apply(obj.body, field_manager=FIELD_MANAGER)
    except KubeApiError as exc:
        raise _api_error(exc, doing=f"applying {obj.label()} from {obj.source}") from exc


def _api_error(exc: KubeApiError, *, doing: str) -> StepError:
    # 4xx other than timeouts and throttling: the server judged the request; sending it again changes nothing.
    if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (408, 429):
        return PermanentError(f"{doing}: {exc.message}", code="apply_rejected")
    return TemporaryError(f"{doing}: {exc.message}", code="api_unavailable", delay_s=2.0)


async def _wait_available(ctx: StepContext, *, api: KubeApi, workloads: list[AddonObject]) -> None:
    loop = asyncio.get_running_loop()
    give_up_at = fail_at(ctx)
    pending = {w.label(): w for w in workloads}
    problems: dict[str, str] = dict.fromkeys(pending, "not seen yet")
    done_count = 0
    while pending:
        for label, workload in list(pending.items()):
            try:
                current = await api.get(workload.api_version, workload.kind, workload.name,
                                        workload.namespace or "default")
            except KubeApiError as exc:
                problems[label] = f"API error: {exc.message}"  # an API restart is waited out, not fatal
                continue
            problem = "not found" if current is None else workload_problem(current)
            if problem is None:
                del pending[label]
                problems.pop(label, None)
                done_count += 1
                ctx.progress(f"{label} available", current=done_count, total=len(workloads))
            else:
                problems[label] = problem
        if not pending:
            return
        if loop.time() + _POLL_S >= give_up_at:
            break
        await asyncio.sleep(_POLL_S)
    raise await _not_available_error(api, pending=pending, problems=problems)


def object_problem(obj: AddonObject, current: dict[str, Any]) -> str | None:
    """Why a live object does not (yet) do what its manifest is for; None when it does."""
    if (obj.api_version, obj.kind) in WORKLOAD_KINDS:
        return workload_problem(current)
    if (obj.api_version, obj.kind) == STORAGE_CLASS:
        wanted = (obj.body["metadata"].get("annotations") or {}).get(DEFAULT_CLASS_ANNOTATION)
        live = ((current.get("metadata") or {}).get("annotations") or {}).get(DEFAULT_CLASS_ANNOTATION)
        if wanted == "true" and live != "true":
            return f"StorageClass {obj.name} is no longer the default class"  # claims without a class stay Pending
    return None


def workload_problem(obj: dict[str, Any]) -> str | None:
    """None when a Deployment is Available (for its current generation) or a DaemonSet has every pod available."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and (observed is None or observed < generation):
        return "status not yet updated by the controller"
    if obj.get("kind") == "DaemonSet":
        desired = int(status.get("desiredNumberScheduled") or 0)
        available = int(status.get("numberAvailable") or 0)
        if desired > 0 and available == desired:
            return None
        return f"{available}/{desired} available" if desired else "no node to schedule on"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Available":
            if condition.get("status") == "True":
                return None
            return f"{int(status.get('availableReplicas') or 0)}/{spec.get('replicas', 1)} available" + (
                f" ({condition['reason']})" if condition.get("reason") else "")
    return "no Available condition yet"


async def _not_available_error(
    api: KubeApi, *, pending: dict[str, AddonObject], problems: dict[str, str]
) -> StepError:
    """Name each workload that is not available, with its pods' reasons (ErrImagePull, CrashLoopBackOff...)."""
    parts: list[str] = []
    for label, workload in pending.items():
        why = problems.get(label, "not available")
        selector = ((workload.body.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if selector:
            try:
                pods = [p for p in await api.list_pods(workload.namespace or "default") if labels_match(selector, p)]
                summary = pods_summary(pods)
                if summary is not None:
                    why += f"; pods: {summary}"
            except KubeApiError as exc:
                why += f"; pods unknown: {exc.message}"
        parts.append(f"{label}: {why}")
    message = "not available before the deadline: " + "; ".join(parts)
    details: dict[str, object] = {"workloads": dict(zip(pending, parts, strict=True))}
    if any(reason in part for part in parts for reason in HOPELESS_REASONS):
        return PermanentError(message, code="not_available", details=details)
    return TemporaryError(message, code="not_available", details=details)

