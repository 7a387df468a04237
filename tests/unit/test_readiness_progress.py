"""While readiness waits, it says every few seconds what it still waits for, so a stuck wait reads differently
from a slow one: the kubelet's /healthz answer and the number of tries; the components not Ready, with counts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
from lifecycle_fakes import make_config

from lifecycle.engine import free_ports
from lifecycle.errors import TemporaryError
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.step import ClusterParams, StepContext
from states import controlplane, readiness


def _pod(name: str, component: str, *, ready: bool) -> dict[str, Any]:
    status = ({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]} if ready else
              {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}]})
    return {"metadata": {"name": name, "uid": name, "labels": {"k8s-app": component}}, "status": status}


class StuckPods:
    """An API whose kube-system pods never change: etcd Ready, two coredns and one kube-proxy being created."""

    async def list_pods(self, namespace: str) -> list[dict[str, Any]]:
        return [_pod("etcd-node", "etcd", ready=True), _pod("coredns-a", "kube-dns", ready=False),
                _pod("coredns-b", "kube-dns", ready=False), _pod("kube-proxy-x", "kube-proxy", ready=False)]

    async def watch_pods(self, namespace: str, *, timeout_s: float) -> AsyncGenerator[dict[str, Any], None]:
        await asyncio.sleep(timeout_s)  # nothing happens
        return
        yield {}

    async def get(self, api_version: str, kind: str, name: str, namespace: str | None) -> dict[str, Any] | None:
        return None


def _context(root: Path, *, healthz_port: int, timeout_s: float) -> tuple[StepContext, list[tuple[str, Any]]]:
    messages: list[tuple[str, Any]] = []

    @asynccontextmanager
    async def connect(_kubeconfig: Path) -> AsyncIterator[StuckPods]:
        yield StuckPods()

    def progress(message: str, **numbers: Any) -> None:
        messages.append((message, (numbers.get("current"), numbers.get("total"))))

    ports = Ports(docker=cast(Any, None), commands=cast(Any, None), kubelet=cast(Any, None),
                  kube=cast(Any, type("Factory", (), {"connect": staticmethod(connect)})()))
    ctx = StepContext(config=make_config(root), paths=HostPaths(root),
                      cluster=ClusterParams(kubernetes_version="v1.31.4", api_port=16443,
                                            kubelet_healthz_port=healthz_port),
                      ports=ports, request_id="r", deadline=asyncio.get_running_loop().time() + timeout_s,
                      log=structlog.get_logger("test"), progress=progress)
    return ctx, messages


async def test_a_kubelet_that_refuses_is_reported_with_its_answer_and_tries(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(controlplane, "REPORT_EVERY_S", 0.3)
    [port] = free_ports("127.0.0.1")  # nothing listens there: connection refused, as from a kubelet not started
    ctx, messages = _context(tmp_path, healthz_port=port, timeout_s=1.6)
    with pytest.raises(TemporaryError):
        await controlplane.wait_control_plane(ctx)
    still = [m for m, _ in messages if m.startswith("still waiting for the kubelet")]
    assert len(still) >= 2, messages
    assert f"127.0.0.1:{port}/healthz): connection refused (" in still[-1] and " tries in " in still[-1]
    tries = [int(m.rsplit("(", 1)[1].split(" ")[0]) for m in still]
    assert tries == sorted(tries) and tries[-1] > tries[0]


async def test_components_that_stay_pending_are_named_with_counts_every_few_seconds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness, "REPORT_EVERY_S", 0.2)
    ctx, messages = _context(tmp_path, healthz_port=1, timeout_s=1.2)
    with pytest.raises(TemporaryError, match="coredns: 0/2 ready"):
        await readiness.wait_for_components(ctx, components=("etcd", "coredns", "kube-proxy"))
    waiting = [(m, counts) for m, counts in messages if m.startswith("waiting for 2 of 3")]
    assert len(waiting) >= 2, messages
    assert waiting[0] == ("waiting for 2 of 3 components: coredns (0/2 ready (Pending)), "
                          "kube-proxy (0/1 ready (Pending))", (1, 3))

