"""The addons step after a stop (issue 10): the objects kept in etcd are enough for `running`, the provisioner's
availability is not waited for, but pods that cannot come back (ErrImagePull) are; an install still waits."""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import structlog
from lifecycle_fakes import make_config

from lifecycle.config import AddonsConfig
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.step import ClusterParams, StepContext
from states.addons import Addons, load_manifests, placeholders

DEPLOY_ADDONS = Path(__file__).resolve().parents[2] / "deploy" / "addons"
ADDONS = AddonsConfig(manifests_dir=DEPLOY_ADDONS,
                      storage_provisioner_image="{repo}/rancher/local-path-provisioner:v0.0.37",
                      storage_helper_image="{repo}/library/busybox:1.37.0")


class KeptObjects:
    """The API after a stop: every addon object as applied, the provisioner's Deployment not available (its pod
    comes back), its pod waiting for `reason`."""

    def __init__(self, objects: list[dict[str, Any]], *, reason: str) -> None:
        self.objects = {(o["kind"], o["metadata"]["name"]): copy.deepcopy(o) for o in objects}
        for (kind, _), body in self.objects.items():
            if kind == "Deployment":
                body["metadata"]["generation"] = 1
                body["status"] = {"observedGeneration": 1, "conditions": [
                    {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"}]}
        self.pod = {"metadata": {"name": "local-path-provisioner-x", "labels": {"app": "local-path-provisioner"}},
                    "status": {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": reason}}}]}}

    async def get(self, api_version: str, kind: str, name: str, namespace: str | None) -> dict[str, Any] | None:
        return self.objects.get((kind, name))

    async def list_pods(self, namespace: str) -> list[dict[str, Any]]:
        return [self.pod]


def _context(root: Path, api: KeptObjects, *, job: str) -> StepContext:
    @asynccontextmanager
    async def connect(_kubeconfig: Path) -> AsyncIterator[KeptObjects]:
        yield api

    config = replace(make_config(root), addons=ADDONS)
    paths = HostPaths(root)
    paths.admin_conf.parent.mkdir(parents=True, exist_ok=True)
    paths.admin_conf.write_text("apiVersion: v1\n")
    ports = Ports(docker=cast(Any, None), commands=cast(Any, None), kubelet=cast(Any, None),
                  kube=cast(Any, type("Factory", (), {"connect": staticmethod(connect)})()))
    return StepContext(config=config, paths=paths, cluster=ClusterParams("v1.31.4", 16443, 20248), ports=ports,
                       request_id="r", deadline=time.monotonic() + 30, log=structlog.get_logger("test"),
                       progress=lambda *a, **k: None, job=job)


def _objects(root: Path) -> list[dict[str, Any]]:
    ctx = _context(root, KeptObjects([], reason=""), job="install")
    return [o.body for o in load_manifests(DEPLOY_ADDONS, placeholders=placeholders(ctx))]


async def test_a_start_takes_the_kept_addons_while_their_pods_come_back_and_an_install_waits(tmp_path: Path) -> None:
    api = KeptObjects(_objects(tmp_path), reason="ContainerCreating")
    assert await Addons().is_done(_context(tmp_path, api, job="start"))
    assert not await Addons().is_done(_context(tmp_path, api, job="install"))


async def test_a_start_does_not_take_addons_whose_pods_cannot_come_back_or_that_are_gone(tmp_path: Path) -> None:
    api = KeptObjects(_objects(tmp_path), reason="ErrImagePull")
    assert not await Addons().is_done(_context(tmp_path, api, job="start"))
    api = KeptObjects([o for o in _objects(tmp_path) if o["kind"] != "ClusterRole"], reason="ContainerCreating")
    assert not await Addons().is_done(_context(tmp_path, api, job="start"))
