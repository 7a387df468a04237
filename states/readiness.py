"""readiness: waits for the control plane (kubelet /healthz, then API /readyz: states/controlplane.py, since
kubeadm v1.31-v1.33 has no `init phase wait-control-plane`), runs kubeadm's init phases that need the API
(upload-config all .. addon all), then waits until the configured kube-system components have all their pods
Running and Ready. Leaves what kubeadm puts in the API.
Done when those pods are Ready now and the kubeadm-config ConfigMap and the coredns Deployment exist.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lifecycle.errors import PermanentError, StepError, TemporaryError
from lifecycle.ports import KubeApi, KubeApiError
from lifecycle.step import StepContext, fail_at
from states.controlplane import wait_control_plane
from states.kubeadm import run_kubeadm
from states.network import BIN_DIR as CNI_BIN_DIR
from states.network import CONF_DIR as CNI_CONF_DIR

# No ("wait-control-plane",): hidden in kubeadm v1.31-v1.33, so not a subcommand; `wait_control_plane` does its work.
API_PHASES: tuple[tuple[str, ...], ...] = (
    ("upload-config", "all"),
    ("mark-control-plane",),
    ("bootstrap-token",),
    ("kubelet-finalize", "all"),
    ("addon", "all"),
)
NAMESPACE = "kube-system"
# Components whose pods carry no `component` label; others match it (static pods) or their name prefix.
_SELECTORS: dict[str, dict[str, str]] = {"coredns": {"k8s-app": "kube-dns"}, "kube-proxy": {"k8s-app": "kube-proxy"}}
# Pod problems that waiting does not cure (repeating the step cannot help until something outside changes).
HOPELESS_REASONS = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CrashLoopBackOff",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})
_WATCH_MAX_S = 30.0
_API_RETRY_S = 0.5
_NODE_POLL_S = 1.0  # the kubelet posts a change of its Ready condition at once (simulated) or within 10 s (real)
REPORT_EVERY_S = 5.0  # while pods do not change, say what is still missing: stuck reads differently from slow


class Readiness:
    """Runs kubeadm's API phases, then watches kube-system pods until the configured components are Ready."""

    name = "readiness"
    timeout_s = 600.0
    retries = 0

    async def is_done(self, ctx: StepContext) -> bool:
        if not ctx.paths.admin_conf.is_file():
            return False
        try:
            async with ctx.ports.kube.connect(ctx.paths.admin_conf) as api:
                pods = await api.list_pods(NAMESPACE)
                if unmet_components(ctx.config.readiness.components, pods):
                    return False
                if await node_not_ready(api, ctx.config.node_name):  # running pods outlive a lost pod network
                    return False
                config_map = await api.get("v1", "ConfigMap", "kubeadm-config", NAMESPACE)
                coredns = await api.get("apps/v1", "Deployment", "coredns", NAMESPACE)
                return config_map is not None and coredns is not None
        except KubeApiError:
            return False

    async def run(self, ctx: StepContext) -> None:
        await wait_control_plane(ctx)
        if await api_phases_applied(ctx):
            # A start after a stop (or a repair): the cluster's objects are kept in etcd; kubeadm is not run again.
            ctx.progress("kubeadm's API phases already applied (kubeadm-config, coredns, kube-proxy in the API)")
            await wait_for_components(ctx, components=ctx.config.readiness.components)
            return
        for index, phase in enumerate(API_PHASES, start=1):
            ctx.progress(f"kubeadm init phase {' '.join(phase)}", current=index, total=len(API_PHASES))
            # These phases create-or-update through the API: repeating them is safe.
            await run_kubeadm(ctx, ["init", "phase", *phase, f"--config={ctx.paths.kubeadm_config}"],
                              retryable=True)
        await wait_for_components(ctx, components=ctx.config.readiness.components)

    async def before_retry(self, ctx: StepContext) -> None:
        return None


async def api_phases_applied(ctx: StepContext) -> bool:
    """Whether what the API phases make is in the API: the kubeadm-config ConfigMap (upload-config, the first)
    and the objects of `addon all`, the last (kubernetes cmd/kubeadm/app/cmd/phases/init/addons.go runs coredns,
    then kube-proxy): the phases run in order, so their last outcomes imply the earlier ones."""
    try:
        async with ctx.ports.kube.connect(ctx.paths.admin_conf) as api:
            return (await api.get("v1", "ConfigMap", "kubeadm-config", NAMESPACE) is not None
                    and await api.get("apps/v1", "Deployment", "coredns", NAMESPACE) is not None
                    and await api.get("apps/v1", "DaemonSet", "kube-proxy", NAMESPACE) is not None)
    except KubeApiError:
        return False  # the phases are run and report what is wrong


async def wait_for_components(ctx: StepContext, *, components: tuple[str, ...]) -> None:
    """Watch kube-system pods until every component is Ready, or fail before the deadline saying why not."""
    loop = asyncio.get_running_loop()
    give_up_at = fail_at(ctx)
    # Updated in place as pods change, so that what was last seen survives the timeout's cancellation.
    unmet: dict[str, str] = dict.fromkeys(components, "no answer from the API yet")
    api_error: str | None = None
    node_seen: list[str | None] = [None]  # the last NotReady reason reported, so each is reported once
    ctx.progress(f"waiting for {', '.join(components)} to be Ready", current=0, total=len(components))
    last_api_error: list[str | None] = [None]
    reporter = asyncio.create_task(_report_waiting(ctx, components=components, unmet=unmet, node=node_seen,
                                                   api_error=last_api_error), name="readiness-report-waiting")
    try:
        async with asyncio.timeout_at(give_up_at), ctx.ports.kube.connect(ctx.paths.admin_conf) as api:
            while True:
                try:
                    await _report_node(ctx, api=api, seen=node_seen)
                    await _watch_until_ready(ctx, api=api, components=components, unmet=unmet)
                    api_error = last_api_error[0] = None
                    if not unmet:
                        # Pods already running stay Ready on a node that lost its pod network: ask the node too.
                        await _report_node(ctx, api=api, seen=node_seen)
                        if node_seen[0] is None:
                            return
                        await asyncio.sleep(min(_NODE_POLL_S, max(0.0, give_up_at - loop.time())))
                except KubeApiError as exc:
                    api_error = last_api_error[0] = exc.message
                    await asyncio.sleep(min(_API_RETRY_S, max(0.0, give_up_at - loop.time())))
    except TimeoutError:
        pass
    except KubeApiError as exc:  # the kubeconfig itself is unusable
        raise PermanentError(f"cannot reach the API: {exc.message}", code="not_ready") from exc
    finally:
        reporter.cancel()
    last = await _last_node_problem(ctx)
    raise not_ready_error(unmet, api_error=api_error, node=node_seen[0] if last is None else last or None)


async def _report_waiting(
    ctx: StepContext, *, components: tuple[str, ...], unmet: Mapping[str, str], node: list[str | None],
    api_error: list[str | None],
) -> None:
    """Every few seconds while components are missing: `waiting for 2 of 4 components: coredns (0/2 ready
    (Pending)), kube-proxy (no pod)`, with the node's problem or the last API error when there is one."""
    while True:
        await asyncio.sleep(REPORT_EVERY_S)
        if not unmet:
            continue
        ctx.progress(waiting_text(components, unmet, node=node[0], api_error=api_error[0]),
                     current=len(components) - len(unmet), total=len(components))


def waiting_text(components: Sequence[str], unmet: Mapping[str, str], *, node: str | None,
                 api_error: str | None) -> str:
    missing = ", ".join(f"{component} ({why})" for component, why in unmet.items())
    text = f"waiting for {len(unmet)} of {len(components)} components: {missing}"
    if node:
        text += f"; {node}"
    if api_error:
        text += f"; last API error: {api_error}"
    return text


async def _report_node(ctx: StepContext, *, api: KubeApi, seen: list[str | None]) -> None:
    problem = await node_not_ready(api, ctx.config.node_name)
    if problem is not None and problem != seen[0]:
        ctx.progress(problem)
    seen[0] = problem


async def _last_node_problem(ctx: StepContext) -> str | None:
    """The node's problem now ("" when Ready), in the little time `fail_at` left before the deadline; None if it
    cannot be had."""
    left_s = ctx.deadline - asyncio.get_running_loop().time() - 0.2
    if left_s <= 0:
        return None
    try:
        async with asyncio.timeout(left_s), ctx.ports.kube.connect(ctx.paths.admin_conf) as api:
            return await node_not_ready(api, ctx.config.node_name) or ""
    except (TimeoutError, KubeApiError):
        return None


async def node_not_ready(api: KubeApi, name: str) -> str | None:
    """`node <name> NotReady: <the kubelet's message>` while the Node's Ready condition is not True.

    A node without a pod network stays NotReady (container runtime network not ready ... cni config
    uninitialized), keeps the not-ready taint, and no pod off the host network (CoreDNS) is ever scheduled:
    without this, the step would only say `coredns: ... (Unschedulable)`.
    """
    node = await api.get("v1", "Node", name, None)
    if node is None:
        return None
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    if ready is None or ready.get("status") == "True":
        return None
    message = str(ready.get("message") or ready.get("reason") or "no reason given")
    if "cni config uninitialized" in message or "NetworkPluginNotReady" in message:
        message += (f" (no valid CNI config in {CNI_CONF_DIR} with its plugins in {CNI_BIN_DIR}; "
                    "the network step writes it)")
    return f"node {name} NotReady: {message}"


async def _watch_until_ready(
    ctx: StepContext, *, api: KubeApi, components: tuple[str, ...], unmet: dict[str, str]
) -> None:
    """One list + watch round, updating `unmet`; returns when all are ready or the server ends the watch."""
    pods = {_key(p): p for p in await api.list_pods(NAMESPACE)}
    _update(ctx, components=components, unmet=unmet, now=unmet_components(components, pods.values()))
    if not unmet:
        return
    left_s = ctx.deadline - asyncio.get_running_loop().time()
    async with contextlib.aclosing(api.watch_pods(NAMESPACE, timeout_s=max(1.0, min(_WATCH_MAX_S, left_s)))) as events:
        async for event in events:
            pod = event.get("object") or {}
            if event.get("type") == "DELETED":
                pods.pop(_key(pod), None)
            elif event.get("type") in ("ADDED", "MODIFIED"):
                pods[_key(pod)] = pod
            _update(ctx, components=components, unmet=unmet, now=unmet_components(components, pods.values()))
            if not unmet:
                return


def _update(
    ctx: StepContext, *, components: tuple[str, ...], unmet: dict[str, str], now: dict[str, str]
) -> None:
    """Replace `unmet` with `now`, reporting each component that became ready."""
    ready_count = len([c for c in components if c not in unmet])
    for component in components:
        if component in unmet and component not in now:
            ready_count += 1
            ctx.progress(f"{component} ready", current=ready_count, total=len(components))
    unmet.clear()
    unmet.update(now)


def not_ready_error(unmet: Mapping[str, str], *, api_error: str | None, node: str | None = None) -> StepError:
    reasons = "; ".join(f"{c}: {why}" for c, why in unmet.items())
    # The node first: while it is NotReady, every unscheduled pod is only a consequence.
    message = f"not ready before the deadline: {node + '; ' if node else ''}{reasons}"
    if api_error:
        message += f" (last API error: {api_error})"
    details: dict[str, object] = {"components": dict(unmet)}
    if node:
        details["node"] = node
    if any(reason in why for why in unmet.values() for reason in HOPELESS_REASONS):
        return PermanentError(message, code="not_ready", details=details)
    return TemporaryError(message, code="not_ready", details=details)


# ---- pod status, shared with the addons state ----------------------------------------------------------


def unmet_components(components: Iterable[str], pods: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """component -> why it is not ready (`0/2 ready (ErrImagePull)`, `no pod`); ready ones are left out."""
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    unmet: dict[str, str] = {}
    for component in components:
        mine = [p for p in live if _belongs_to(component, p)]
        why = pods_summary(mine)
        if why is not None:
            unmet[component] = why
    return unmet


def pods_summary(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """None when every pod is Ready, else `n/m ready (reasons)` or `no pod`."""
    if not pods:
        return "no pod"
    not_ready = [p for p in pods if not pod_ready(p)]
    if not not_ready:
        return None
    reasons = sorted({pod_problem(p) for p in not_ready})
    return f"{len(pods) - len(not_ready)}/{len(pods)} ready ({', '.join(reasons)})"


def pod_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pod_problem(pod: Mapping[str, Any]) -> str:
    """The most telling reason a pod is not Ready, as kubectl's STATUS column would show it."""
    status = pod.get("status") or {}
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        state = container.get("state") or {}
        for key in ("waiting", "terminated"):
            reason = (state.get(key) or {}).get("reason")
            if reason and reason not in ("ContainerCreating", "PodInitializing", "Completed"):
                return str(reason)
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return str(condition.get("reason") or "Unschedulable")
    phase = status.get("phase") or "Pending"
    return "not Ready" if phase == "Running" else str(phase)


def labels_match(selector: Mapping[str, str], pod: Mapping[str, Any]) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _belongs_to(component: str, pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get("component") == component or labels.get("k8s-app") == component:
        return True
    selector = _SELECTORS.get(component)
    if selector is not None and labels_match(selector, pod):
        return True
    return str(meta.get("name", "")).startswith(f"{component}-")


def _key(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return str(meta.get("uid") or meta.get("name"))
