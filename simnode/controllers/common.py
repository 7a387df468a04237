"""What the control-plane stand-ins share: flag parsing in the real `--flag=value` style, logging, a
signal-driven run loop (SIGTERM/SIGINT -> exit 0), the leader-election Lease, and small object helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from simnode.kubeclient import ApiError, KubeClient
from simnode.paths import NodeRoot

log = logging.getLogger("component")

Obj = dict[str, Any]
LEASE_DURATION_S = 15
LEASE_RENEW_S = 2.0


class FlagError(Exception):
    pass


def parse_flags(tool: str, argv: list[str], *, bools: frozenset[str] = frozenset()) -> dict[str, str]:
    """`--name=value` (and `--name value`) flags; booleans may stand alone. Unknown names are accepted
    and ignored by the caller (kubeadm passes many flags these stand-ins have no use for)."""
    flags: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or len(arg) == 2:
            raise FlagError(f"{tool}: unexpected argument {arg!r} (flags look like --name=value)")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if name in bools or i >= len(argv) or argv[i].startswith("--"):
                value = "true"
            else:
                value = argv[i]
                i += 1
        flags[name] = value
    return flags


def setup_logging(flags: dict[str, str]) -> None:
    verbose = flags.get("v", "0").isdigit() and int(flags.get("v", "0")) >= 4
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s] %(message)s")


def client_from_flags(tool: str, flags: dict[str, str], root: NodeRoot) -> KubeClient:
    kubeconfig = flags.get("kubeconfig")
    if not kubeconfig:
        raise FlagError(f"{tool}: --kubeconfig is required")
    return KubeClient.from_kubeconfig(Path(kubeconfig), root=root)


def run_until_signal(main: Callable[[], Awaitable[None]]) -> int:
    """Run `main()` until SIGTERM/SIGINT (exit 0) or until it fails (exit 1)."""

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        work = asyncio.create_task(_as_coro(main), name="component main")
        stopper = asyncio.create_task(stop.wait(), name="component stop")
        await asyncio.wait([work, stopper], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if work.done() and not work.cancelled() and work.exception() is not None:
            log.error("failed: %s", work.exception(), exc_info=work.exception())
            code = 1
        work.cancel()
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        return code

    return asyncio.run(runner())


async def _as_coro(main: Callable[[], Awaitable[None]]) -> None:
    await main()


def micro_time(ts: float | None = None) -> str:
    ts = time.time() if ts is None else ts
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def rfc3339(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if ts is None else ts))


async def hold_leader_lease(client: KubeClient, name: str, identity: str) -> None:
    """Keep the kube-system Lease `name` renewed, as leader election does (single instance: we always
    win). Failures are logged and retried; a component keeps working while the API is away."""
    collection = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"
    acquired = micro_time()
    transitions = 0
    while True:
        now = micro_time()
        spec = {"holderIdentity": identity, "leaseDurationSeconds": LEASE_DURATION_S,
                "acquireTime": acquired, "renewTime": now, "leaseTransitions": transitions}
        try:
            try:
                current = await client.get(f"{collection}/{name}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
                await client.create(collection, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                                 "metadata": {"name": name, "namespace": "kube-system"},
                                                 "spec": spec})
                log.info("acquired lease kube-system/%s", name)
            else:
                if (current.get("spec") or {}).get("holderIdentity") != identity:
                    transitions = int((current.get("spec") or {}).get("leaseTransitions") or 0) + 1
                    spec["leaseTransitions"] = transitions
                    log.info("took over lease kube-system/%s", name)
                await client.patch(f"{collection}/{name}", {"spec": spec})
        except ApiError as exc:
            log.debug("lease %s: %s", name, exc)
        await asyncio.sleep(LEASE_RENEW_S)


# --- object helpers -----------------------------------------------------------------------------------


def meta(obj: Obj) -> dict[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def controller_uid(obj: Obj) -> str | None:
    for ref in meta(obj).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def owner_ref(owner: Obj, api_version: str, kind: str) -> dict[str, Any]:
    m = meta(owner)
    return {"apiVersion": api_version, "kind": kind, "name": m["name"], "uid": m["uid"],
            "controller": True, "blockOwnerDeletion": True}


def pod_ready(pod: Obj) -> bool:
    if meta(pod).get("deletionTimestamp"):
        return False
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def node_ready(node: Obj) -> bool:
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def labels_match(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against labels; an empty selector matches none
    here, because workload selectors are required and an empty one would adopt everything."""
    if not selector:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        if not expression_matches(expr, labels.get(expr.get("key", "")), expr.get("key", "") in labels):
            return False
    return True


def expression_matches(expr: dict[str, Any], value: str | None, present: bool) -> bool:
    op = expr.get("operator")
    values = expr.get("values") or []
    if op == "In":
        return present and value in values
    if op == "NotIn":
        return not present or value not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    return False


def tolerates(tolerations: list[dict[str, Any]], taint: dict[str, Any]) -> bool:
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists":
            if not t.get("key") or t.get("key") == taint.get("key"):
                return True
        elif t.get("key") == taint.get("key") and (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def untolerated_taints(pod_spec: dict[str, Any], node: Obj) -> list[dict[str, Any]]:
    """The node's NoSchedule/NoExecute taints the pod does not tolerate."""
    tolerations = pod_spec.get("tolerations") or []
    return [
        t for t in (node.get("spec") or {}).get("taints") or []
        if t.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tolerations, t)
    ]
