"""The kubelet's cgroup driver comes from the container engine (finding 6): the certs step writes what the engine
reports into the KubeletConfiguration, is no longer done when the engine's driver changes, and an engine that
cannot be asked is a named error that writes nothing."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
import yaml

from lifecycle.config import Config, DockerConfig, KubernetesConfig, PkiConfig, VersionImages
from lifecycle.errors import PermanentError
from lifecycle.paths import HostPaths
from lifecycle.ports import ContainerEngine, EngineError, Ports
from lifecycle.step import ClusterParams, StepContext
from states.certs import Certs

VERSION = "v1.31.4"


class InfoOnlyEngine:
    """Answers `docker info`'s CgroupDriver (or fails as an unreachable engine does); nothing else is asked."""

    def __init__(self, driver: str | None) -> None:
        self.driver = driver
        self.asked = 0

    async def cgroup_driver(self) -> str:
        self.asked += 1
        if self.driver is None:
            raise EngineError("Cannot connect to the Docker daemon at unix:///var/run/docker.sock")
        return self.driver


def _ctx(root: Path, engine: InfoOnlyEngine) -> StepContext:
    kubernetes = KubernetesConfig(
        version=VERSION, image_repository="registry.example.test/k8s", versions={
            VERSION: VersionImages(etcd="3.5.15-0", coredns="v1.11.3", pause="3.10")},
        node_ip="127.0.0.1", endpoint_name="localhost")
    config = Config(node_name="node-a", root=root, kubernetes=kubernetes, pki=PkiConfig(),
                    docker=DockerConfig(host="unix:///nonexistent"))
    unused = cast(Any, None)
    return StepContext(
        config=config, paths=HostPaths(root),
        cluster=ClusterParams(kubernetes_version=VERSION, api_port=16443, kubelet_healthz_port=20248),
        ports=Ports(docker=cast(ContainerEngine, engine), commands=unused, kubelet=unused, kube=unused),
        request_id="test", deadline=time.monotonic() + 60, log=structlog.get_logger("test"),
        progress=lambda *_a, **_k: None,
    )


def _kubelet_config(ctx: StepContext) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(ctx.paths.kubeadm_config.read_text()))
    kubelet = docs[2]
    assert kubelet["kind"] == "KubeletConfiguration"
    return dict(kubelet)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


async def test_an_engine_on_systemd_gets_a_kubelet_on_systemd(tmp_path: Path) -> None:
    engine = InfoOnlyEngine("systemd")
    ctx = _ctx(tmp_path, engine)
    await Certs().run(ctx)
    assert _kubelet_config(ctx)["cgroupDriver"] == "systemd"
    assert engine.asked >= 1
    assert await Certs().is_done(ctx)


async def test_an_engine_that_changed_driver_makes_the_config_stale(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, InfoOnlyEngine("cgroupfs"))
    await Certs().run(ctx)
    assert _kubelet_config(ctx)["cgroupDriver"] == "cgroupfs"
    moved = replace(ctx, ports=replace(ctx.ports, docker=cast(ContainerEngine, InfoOnlyEngine("systemd"))))
    assert not await Certs().is_done(moved)
    await Certs().run(moved)
    assert _kubelet_config(moved)["cgroupDriver"] == "systemd"


async def test_an_engine_that_cannot_be_asked_is_a_named_error_and_nothing_is_written(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, InfoOnlyEngine(None))
    assert not await Certs().is_done(ctx)
    with pytest.raises(PermanentError) as err:
        await Certs().run(ctx)
    assert err.value.code == "engine_unavailable"
    assert "cgroup driver" in str(err.value) and "Cannot connect to the Docker daemon" in str(err.value)
    assert not _files(tmp_path)


