"""The static pod restarts of a renewal against a fake API whose "kubelet" follows the manifests: etcd,
controller-manager and scheduler first, while the API answers; kube-apiserver last, only once they are Ready
again; the time the API did not answer during its restart is reported."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import structlog
import yaml
from lifecycle_fakes import make_config

from lifecycle.paths import HostPaths
from lifecycle.ports import KubeApiError, Ports
from lifecycle.step import ClusterParams, StepContext
from states import renewing

COMPONENTS = ("etcd", "kube-controller-manager", "kube-scheduler", "kube-apiserver")


class FollowingKubelet:
    """list_pods answers what a kubelet would report for the manifests on disk; when kube-apiserver's manifest
    changes, the API is away for `away_calls` calls (its restart)."""

    def __init__(self, manifests: Path, *, away_calls: int = 3) -> None:
        self.manifests = manifests
        self.away_calls = away_calls
        self.apiserver_stamp: str | None = None
        self.calls = 0
        self.first_seen: dict[str, int] = {}  # component -> the call that first reported it restarted (Ready)

    def _stamp(self, component: str) -> str | None:
        pod = yaml.safe_load((self.manifests / f"{component}.yaml").read_text())
        return ((pod.get("metadata") or {}).get("annotations") or {}).get(renewing.ANNOTATION)

    async def list_pods(self, namespace: str) -> list[dict[str, Any]]:
        self.calls += 1
        stamp = self._stamp("kube-apiserver")
        if stamp is not None and stamp != self.apiserver_stamp:
            if self.away_calls > 0:
                self.away_calls -= 1
                await asyncio.sleep(0.05)  # a refused connection takes a moment too
                raise KubeApiError("GET /api/v1/namespaces/kube-system/pods: connection refused")
            self.apiserver_stamp = stamp
        pods = []
        for component in COMPONENTS:
            current = self._stamp(component)
            if current is not None:
                self.first_seen.setdefault(component, self.calls)
            pods.append({"metadata": {"name": f"{component}-node-a", "labels": {"component": component},
                                      "annotations": {renewing.ANNOTATION: current} if current else {}},
                         "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
        return pods


def _context(root: Path, kube: FollowingKubelet) -> tuple[StepContext, list[str]]:
    messages: list[str] = []

    @asynccontextmanager
    async def connect(_kubeconfig: Path) -> AsyncIterator[FollowingKubelet]:
        yield kube

    def progress(message: str, **_: object) -> None:
        messages.append(message)

    ports = Ports(docker=cast(Any, None), commands=cast(Any, None), kubelet=cast(Any, None),
                  kube=cast(Any, type("Factory", (), {"connect": staticmethod(connect)})()))
    ctx = StepContext(config=make_config(root), paths=HostPaths(root),
                      cluster=ClusterParams(kubernetes_version="v1.31.4", api_port=16443, kubelet_healthz_port=20248),
                      ports=ports, request_id="r", deadline=time.monotonic() + 30,
                      log=structlog.get_logger("test"), progress=progress)
    return ctx, messages


async def test_kube_apiserver_restarts_last_once_the_others_are_ready_and_the_gap_is_reported(tmp_path: Path) -> None:
    manifests = HostPaths(tmp_path).manifests_dir
    manifests.mkdir(parents=True)
    for component in COMPONENTS:
        (manifests / f"{component}.yaml").write_text(yaml.safe_dump(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": component, "labels": {"component": component}}}))
    kube = FollowingKubelet(manifests)
    ctx, messages = _context(tmp_path, kube)

    await renewing._restart_static_pods(ctx)

    others = max(kube.first_seen[c] for c in COMPONENTS[:-1])
    assert kube.first_seen["kube-apiserver"] > others, f"kube-apiserver annotated with the others: {kube.first_seen}"
    assert kube.apiserver_stamp is not None and kube.away_calls == 0
    assert messages[0].startswith("restarting etcd, kube-controller-manager, kube-scheduler (manifests annotated")
    last = next(i for i, m in enumerate(messages) if m.startswith("restarting kube-apiserver last"))
    assert {"etcd restarted and Ready", "kube-scheduler restarted and Ready"} <= set(messages[:last])
    gap = messages[-1]
    assert gap.startswith("kube-apiserver restarted: the API did not answer for ") and gap.endswith(" s")
    assert float(gap.split("for ")[1].removesuffix(" s")) > 0.0
