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

import pytest
import structlog
from lifecycle_fakes import make_config

from lifecycle.config import AddonsConfig
from lifecycle.errors import PermanentError
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.step import ClusterParams, StepContext
from states import addons
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
    return [o.body for o in load_manifests(DEPLOY_ADDONS, placeholders=placeholders(ctx.config))]


async def test_a_start_takes_the_kept_addons_while_their_pods_come_back_and_an_install_waits(tmp_path: Path) -> None:
    api = KeptObjects(_objects(tmp_path), reason="ContainerCreating")
    assert await Addons().is_done(_context(tmp_path, api, job="start"))
    assert not await Addons().is_done(_context(tmp_path, api, job="install"))


async def test_a_start_does_not_take_addons_whose_pods_cannot_come_back_or_that_are_gone(tmp_path: Path) -> None:
    api = KeptObjects(_objects(tmp_path), reason="ErrImagePull")
    assert not await Addons().is_done(_context(tmp_path, api, job="start"))
    api = KeptObjects([o for o in _objects(tmp_path) if o["kind"] != "ClusterRole"], reason="ContainerCreating")
    assert not await Addons().is_done(_context(tmp_path, api, job="start"))


class Flapping(KeptObjects):
    """KeptObjects whose provisioner pod shows `reason` for its first `flaps` listings, then ContainerCreating;
    applies are taken as they come (the objects are there already)."""

    def __init__(self, objects: list[dict[str, Any]], *, reason: str, flaps: int) -> None:
        super().__init__(objects, reason=reason)
        self.flaps, self.listings = flaps, 0
        for body in self.objects.values():  # the Deployment's status from before the stop: available
            if body["kind"] == "Deployment":
                body["status"] = {"observedGeneration": 1, "conditions": [{"type": "Available", "status": "True"}]}

    async def apply(self, body: dict[str, Any], *, field_manager: str) -> dict[str, Any]:
        return body

    async def list_pods(self, namespace: str) -> list[dict[str, Any]]:
        self.listings += 1
        if self.listings > self.flaps:
            self.pod["status"]["containerStatuses"] = [{"state": {"waiting": {"reason": "ContainerCreating"}}}]
        return [self.pod]


async def test_a_start_waits_out_a_passing_crash_loop_instead_of_trusting_the_old_status(tmp_path: Path) -> None:
    """A start found the provisioner's pod in CrashLoopBackOff (crashed while the API server was starting): the
    step ran, took the Deployment's pre-stop `Available` for done, and failed its outcome check 0.2 s later. Its run
    now waits until no pod shows such a reason, so the outcome check holds."""
    api = Flapping(_objects(tmp_path), reason="CrashLoopBackOff", flaps=5)
    ctx = _context(tmp_path, api, job="start")
    assert not await Addons().is_done(ctx)
    await Addons().run(ctx)
    assert await Addons().is_done(ctx), "the start's outcome check holds after its run"


async def test_a_start_fails_on_pods_that_stay_hopeless_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(addons, "HOPELESS_GRACE_S", 0.3)
    api = Flapping(_objects(tmp_path), reason="ErrImagePull", flaps=10**6)
    with pytest.raises(PermanentError) as failed:
        await Addons().run(_context(tmp_path, api, job="start"))
    assert failed.value.code == "not_available" and "ErrImagePull" in str(failed.value)
