"""Configuration changes on an installed cluster: which keys drift and how each is taken (lifecycle.drift), the
kubeadm step on a node where it made a cluster (never `kubeadm reset`: live fields applied, the rest refused), and
the engine (reset-only keys held at their installed values, shown in the status, an install refused)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from lifecycle_fakes import fake_plan, fake_reset, make_config, null_ports

from lifecycle.bus import Bus
from lifecycle.config import Config
from lifecycle.drift import (
    KUBEADM_STAMP,
    apply,
    compare,
    kubeadm_config_changes,
    needs_kubeadm,
    pending,
    settings_of,
)
from lifecycle.engine import Engine
from lifecycle.errors import PermanentError, RequestError
from lifecycle.kubefiles import render_kubeadm_config
from lifecycle.logging import get_logger
from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.ports import CommandResult, Ports
from lifecycle.service import state_file
from lifecycle.step import ClusterParams, StepContext
from states.kubeadm import STATIC_POD_MANIFESTS, Kubeadm

CLUSTER = ClusterParams(kubernetes_version="v1.31.4", api_port=6443, kubelet_healthz_port=10248,
                        etcd_metrics_port=2381)


def _config(tmp_path: Path, **kubernetes: Any) -> Config:
    config = make_config(tmp_path)
    return replace(config, kubernetes=replace(config.kubernetes, **kubernetes))


def test_live_and_reset_only_changes_are_told_apart_and_ports_left_at_zero_never_drift(tmp_path: Path) -> None:
    installed = settings_of(_config(tmp_path), CLUSTER)
    assert compare(installed, _config(tmp_path)) == []  # api_port/kubelet_healthz_port 0: any installed port
    changed = _config(tmp_path, node_ip="127.0.0.2", pod_subnet="10.245.0.0/16", extra_sans=("api.test",),
                      kubelet_healthz_port=10300)
    changes = compare(installed, changed)
    assert [(c.key, c.live) for c in changes] == [
        ("kubernetes.node_ip", False), ("kubernetes.kubelet_healthz_port", True),
        ("kubernetes.pod_subnet", False), ("kubernetes.extra_sans", True)]
    assert [c.to_json() for c in pending(changes)] == [
        {"key": "kubernetes.node_ip", "installed": "127.0.0.1", "configured": "127.0.0.2"},
        {"key": "kubernetes.pod_subnet", "installed": "10.244.0.0/16", "configured": "10.245.0.0/16"}]
    effective, cluster = apply(changed, CLUSTER, changes)
    assert (effective.kubernetes.node_ip, effective.kubernetes.pod_subnet) == ("127.0.0.1", "10.244.0.0/16")
    assert effective.kubernetes.extra_sans == ("api.test",) and cluster.kubelet_healthz_port == 10300
    rsa = replace(changed, pki=replace(changed.pki, key_algorithm="rsa-2048"))
    assert [c.key for c in pending(compare(installed, rsa))][-1] == "pki.key_algorithm"


def test_kubeadm_config_fields_a_running_cluster_takes_without_kubeadm(tmp_path: Path) -> None:
    base = _config(tmp_path)

    def rendered(config: Config, cluster: ClusterParams = CLUSTER) -> str:
        return render_kubeadm_config(config, cluster, certificates_dir=tmp_path / "pki",
                                     cgroup_driver="cgroupfs").decode()

    sans = kubeadm_config_changes(rendered(base), rendered(_config(tmp_path, extra_sans=("api.test",))))
    assert sans == ["ClusterConfiguration.apiServer.certSANs"] and needs_kubeadm(sans) == []
    port = kubeadm_config_changes(rendered(base), rendered(base, replace(CLUSTER, kubelet_healthz_port=10300)))
    assert port == ["KubeletConfiguration.healthzPort"] and needs_kubeadm(port) == []
    node_ip = kubeadm_config_changes(rendered(base), rendered(_config(tmp_path, node_ip="127.0.0.2")))
    assert "InitConfiguration.localAPIEndpoint.advertiseAddress" in needs_kubeadm(node_ip)
    subnet = kubeadm_config_changes(rendered(base), rendered(_config(tmp_path, pod_subnet="10.245.0.0/16")))
    assert needs_kubeadm(subnet) == ["ClusterConfiguration.networking.podSubnet"]


# ---- the kubeadm step on a node where it made a cluster -------------------------------------------------------


@dataclass
class _Commands:
    argv: list[list[str]] = field(default_factory=list)

    async def run(self, argv: Sequence[str], *, on_line: Callable[[str], None] | None = None,
                  env: Any = None, tail_lines: int = 40) -> CommandResult:
        self.argv.append(list(argv))  # any kubeadm call at all is a failure of these tests
        return CommandResult(tuple(argv), 0, ())


@dataclass
class _Kubelet:
    stops: int = 0

    async def start(self, argv: Sequence[str], *, log_path: Path) -> None:
        raise AssertionError("the kubelet step starts the kubelet, not the kubeadm step")

    async def stop(self, *, timeout_s: float = 10.0) -> None:
        self.stops += 1

    def is_running(self) -> bool:
        return self.stops == 0

    @property
    def restarts(self) -> int:
        return 0


def _ctx(config: Config, cluster: ClusterParams, commands: _Commands, kubelet: _Kubelet) -> StepContext:
    ports = Ports(docker=cast(Any, None), commands=commands, kubelet=kubelet, kube=cast(Any, None))
    return StepContext(config=config, paths=HostPaths(config.root), cluster=cluster, ports=ports, request_id="r",
                       deadline=asyncio.get_running_loop().time() + 5, log=get_logger("test"),
                       progress=lambda message, **_: None)


async def _made_by_kubeadm(ctx: StepContext) -> None:
    """What a finished kubeadm step leaves: its stamp (written by the step's own code, its phases run by the fake
    runner), the files kubeadm's phases would have written, and etcd data."""
    paths = ctx.paths
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    paths.kubeadm_config.write_bytes(render_kubeadm_config(ctx.config, ctx.cluster, certificates_dir=paths.pki_dir,
                                                           cgroup_driver="cgroupfs"))
    paths.bin_dir.mkdir(parents=True)
    paths.binary("kubeadm").touch()
    await Kubeadm().run(ctx)
    for name in STATIC_POD_MANIFESTS:
        (paths.manifests_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (paths.manifests_dir / name).write_text("kind: Pod\n")
    paths.kubelet_dir.mkdir(parents=True, exist_ok=True)
    paths.kubeadm_flags_env.write_text('KUBELET_KUBEADM_ARGS="--node-ip=127.0.0.1"\n')
    paths.kubelet_config.write_text(yaml.safe_dump({"kind": "KubeletConfiguration", "healthzPort": 10248,
                                                    "evictionHard": {"memory.available": "100Mi"}}))
    (paths.etcd_dir / "member").mkdir(parents=True)
    assert await Kubeadm().is_done(ctx)


async def test_a_changed_kubelet_port_on_a_made_cluster_rewrites_the_kubelet_config_without_kubeadm(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    await _made_by_kubeadm(_ctx(config, CLUSTER, _Commands(), _Kubelet()))
    commands, kubelet = _Commands(), _Kubelet()
    ctx = _ctx(config, replace(CLUSTER, kubelet_healthz_port=10300), commands, kubelet)
    ctx.paths.kubeadm_config.write_bytes(render_kubeadm_config(config, ctx.cluster, certificates_dir=ctx.paths.pki_dir,
                                                               cgroup_driver="cgroupfs"))
    assert not await Kubeadm().is_done(ctx)
    await Kubeadm().run(ctx)
    assert commands.argv == [] and kubelet.stops == 1  # no kubeadm at all; the kubelet step starts the kubelet
    kubelet_config = yaml.safe_load(ctx.paths.kubelet_config.read_text())
    assert kubelet_config["healthzPort"] == 10300
    assert kubelet_config["evictionHard"] == {"memory.available": "100Mi"}  # kubeadm's defaults kept
    assert (ctx.paths.etcd_dir / "member").is_dir()
    assert await Kubeadm().is_done(ctx)
    stamp = json.loads((ctx.paths.state_dir / KUBEADM_STAMP).read_text())
    assert stamp["settings"]["kubernetes.kubelet_healthz_port"] == 10300


async def test_a_reset_only_change_reaching_the_kubeadm_step_is_refused_and_nothing_is_reset(tmp_path: Path) -> None:
    config = _config(tmp_path)
    await _made_by_kubeadm(_ctx(config, CLUSTER, _Commands(), _Kubelet()))
    commands, kubelet = _Commands(), _Kubelet()
    ctx = _ctx(_config(tmp_path, pod_subnet="10.245.0.0/16"), CLUSTER, commands, kubelet)
    stamp_before = (ctx.paths.state_dir / KUBEADM_STAMP).read_bytes()
    ctx.paths.kubeadm_config.write_bytes(render_kubeadm_config(ctx.config, CLUSTER, certificates_dir=ctx.paths.pki_dir,
                                                               cgroup_driver="cgroupfs"))
    with pytest.raises(PermanentError) as refused:
        await Kubeadm().run(ctx)
    assert refused.value.code == "reset_required"
    assert refused.value.details["fields"] == ["ClusterConfiguration.networking.podSubnet"]
    await Kubeadm().before_retry(ctx)  # what the engine would call before a retry: still no reset
    assert commands.argv == [] and kubelet.stops == 0
    assert (ctx.paths.etcd_dir / "member").is_dir()
    assert (ctx.paths.state_dir / KUBEADM_STAMP).read_bytes() == stamp_before


async def test_a_cluster_stamped_by_an_earlier_version_is_never_reset_for_a_changed_config(tmp_path: Path) -> None:
    config = _config(tmp_path)
    await _made_by_kubeadm(_ctx(config, CLUSTER, _Commands(), _Kubelet()))
    stamp_path = HostPaths(tmp_path).state_dir / KUBEADM_STAMP
    old = json.loads(stamp_path.read_text())
    stamp_path.write_text(json.dumps({"kubeadm_config_sha256": old["kubeadm_config_sha256"], "phases": old["phases"]}))
    commands, kubelet = _Commands(), _Kubelet()
    ctx = _ctx(_config(tmp_path, extra_sans=("api.test",)), CLUSTER, commands, kubelet)
    ctx.paths.kubeadm_config.write_bytes(render_kubeadm_config(ctx.config, CLUSTER, certificates_dir=ctx.paths.pki_dir,
                                                               cgroup_driver="cgroupfs"))
    with pytest.raises(PermanentError) as refused:
        await Kubeadm().run(ctx)
    assert refused.value.code == "reset_required" and "earlier version" in refused.value.message
    assert commands.argv == [] and kubelet.stops == 0 and (ctx.paths.etcd_dir / "member").is_dir()


# ---- the engine -------------------------------------------------------------------------------------------------


def _engine(config: Config) -> Engine:
    paths = HostPaths(config.root)
    return Engine(config=config, paths=paths, ports=null_ports(), plan=fake_plan(), reset=fake_reset,
                  store=state_file(paths), bus=Bus())


async def test_reset_only_keys_are_held_shown_in_the_status_and_refuse_an_install_until_a_reset(
    tmp_path: Path,
) -> None:
    engine = _engine(_config(tmp_path))
    await engine.install(request_id="i1", version=None)
    await engine.wait_job()
    cluster = engine.status()
    assert cluster.state == "running" and cluster.config_drift == ()
    await engine.shutdown()
    saved = state_file(engine.paths).load()
    snap_cluster = saved.cluster if saved is not None else None  # the parameters the install fixed
    assert snap_cluster is not None
    stamp = {"settings": settings_of(engine.config, snap_cluster)}  # as the kubeadm step records them
    (engine.paths.state_dir / KUBEADM_STAMP).write_text(json.dumps(stamp))

    engine = _engine(_config(tmp_path, node_ip="127.0.0.2", extra_sans=("api.test",)))
    await engine.start()
    await engine.wait_job()
    status = engine.status()
    assert status.state == "running"
    assert status.config_drift == ({"key": "kubernetes.node_ip", "installed": "127.0.0.1",
                                    "configured": "127.0.0.2"},)
    assert engine.config.kubernetes.node_ip == "127.0.0.1"  # what the steps (and the kubeconfig reply) are given
    assert engine.config.kubernetes.extra_sans == ("api.test",)  # live: taken as configured
    with pytest.raises(RequestError) as refused:
        await engine.install(request_id="i2", version=None)
    assert refused.value.code == "reset_required" and "kubernetes.node_ip" in refused.value.message
    assert engine.state == State.RUNNING

    await engine.reset(request_id="wipe")
    await engine.wait_job()
    assert engine.state == State.IDLE and engine.status().config_drift == ()
    assert engine.config.kubernetes.node_ip == "127.0.0.2"
    await engine.shutdown()
