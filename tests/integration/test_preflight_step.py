"""The preflight state on a machine view laid out by simnode/host.py: every unmet prerequisite reported at once
with its check name and fix, nothing written; the node address detected, or refused when it is not this machine's;
the API endpoint name given a hosts entry when it resolves nowhere, refused when it leads elsewhere. The engine
runs the real preflight step (the later steps are test steps)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lifecycle_fakes import FakeStep, drain_events, fake_reset, make_config, null_ports
from machine_view import break_prerequisites, tree
from stepkit import ProgressLog, make_ctx, with_k8s
from stepkit import make_config as step_config

from lifecycle.bus import Bus
from lifecycle.config import Config
from lifecycle.engine import Engine
from lifecycle.errors import PermanentError
from lifecycle.machine import State
from lifecycle.nodeaddr import NodeAddressError, detect_node_ip
from lifecycle.paths import HostPaths
from lifecycle.protocol import EventType
from lifecycle.statefile import state_file
from lifecycle.step import Step, StepContext
from simnode.host import VM_ADDRESS, prepare_host
from states.preflight import Preflight


@pytest.fixture
def machine(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    prepare_host(root)
    return root


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port something else listens on (as kubeadm's Port check sees one in use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def preflight_ctx(config: Config, *, api_port: int) -> tuple[StepContext, ProgressLog]:
    """A step context whose ports are the test's own (kubeadm's default 2381 may be another test node's etcd)."""
    ctx, progress = make_ctx(config, api_port=api_port or free_port())
    return replace(ctx, cluster=replace(ctx.cluster, kubelet_healthz_port=free_port(),
                                        etcd_metrics_port=free_port())), progress


async def test_every_unmet_prerequisite_is_reported_at_once_and_nothing_is_written(
    machine: Path, held_port: int
) -> None:
    break_prerequisites(machine)
    (machine / "sys/devices/system/cpu/online").write_text("0\n")
    (machine / "proc/meminfo").write_text("MemTotal:        1048576 kB\n")
    (machine / "var/lib/etcd/member").mkdir(parents=True)
    before = tree(machine)
    ctx, progress = preflight_ctx(step_config(machine), api_port=held_port)
    step = Preflight()
    assert not await step.is_done(ctx)  # checked, not remembered: reads only
    with pytest.raises(PermanentError) as raised:
        await step.run(ctx)
    error = raised.value
    assert error.code == "prerequisites"
    listed = error.details["checks"]
    assert isinstance(listed, list)
    checks = {c["check"]: c for c in listed}
    assert set(checks) == {"NumCPU", "Mem", "FileExisting-conntrack", "FileContent--proc-sys-net-ipv4-ip_forward",
                           "Swap", f"Port-{held_port}", "DirAvailable--var-lib-etcd"}
    assert checks["Swap"]["fix"].startswith("swapoff -a")
    assert checks["FileContent--proc-sys-net-ipv4-ip_forward"]["fix"].startswith("sysctl -w net.ipv4.ip_forward=1")
    assert checks["FileExisting-conntrack"]["fix"] == "apt-get install -y conntrack"
    assert checks[f"Port-{held_port}"]["problem"] == f"Port {held_port} is in use"
    assert "7 preflight checks failed, nothing was changed" in error.message
    assert "[ERROR Swap]: swap is on (/swapfile)" in error.message
    assert tree(machine) == before and not progress.calls


async def test_conntrack_is_required_below_v1_32_only(machine: Path) -> None:
    (machine / "usr/sbin/conntrack").unlink()
    ctx, _ = preflight_ctx(step_config(machine), api_port=0)
    with pytest.raises(PermanentError, match="FileExisting-conntrack"):
        await Preflight().run(ctx)
    ctx = replace(ctx, cluster=replace(ctx.cluster, kubernetes_version="v1.32.1"))
    await Preflight().run(ctx)


async def test_a_node_with_a_cluster_skips_the_checks(machine: Path, held_port: int) -> None:
    ctx, _ = preflight_ctx(step_config(machine), api_port=held_port)  # a running API server holds its port
    (machine / "etc/kubernetes/manifests").mkdir(parents=True)
    (machine / "etc/kubernetes/manifests/kube-apiserver.yaml").write_text("kind: Pod\n")
    assert await Preflight().is_done(ctx)


def test_node_ip_is_the_address_of_the_default_routes_interface(machine: Path) -> None:
    assert detect_node_ip(machine) == VM_ADDRESS
    route = machine / "proc/net/route"
    route.write_text(route.read_text().replace("eth0", "ens3"))  # the interface's name does not matter
    assert detect_node_ip(machine) == VM_ADDRESS
    route.write_text(route.read_text().splitlines()[0] + "\n")  # no default route
    with pytest.raises(NodeAddressError, match="no default route"):
        detect_node_ip(machine)


async def test_a_configured_node_ip_that_is_not_the_machines_is_refused(machine: Path) -> None:
    before = tree(machine)
    config = with_k8s(step_config(machine), node_ip="192.168.65.3", endpoint_name="kubernetes.docker.internal")
    ctx, _ = preflight_ctx(config, api_port=0)
    with pytest.raises(PermanentError) as raised:
        await Preflight().run(ctx)
    assert raised.value.code == "node_ip_not_local"
    assert "192.168.65.3 is not an address of this machine (it has 10.0.2.15)" in raised.value.message
    assert tree(machine) == before  # no hosts entry for an address that is not ours


async def test_an_endpoint_name_that_resolves_nowhere_gets_a_hosts_entry(machine: Path) -> None:
    name = "api.lifecycle-preflight.invalid"  # RFC 6761: never resolves through DNS
    ctx, progress = preflight_ctx(with_k8s(step_config(machine), node_ip=VM_ADDRESS, endpoint_name=name), api_port=0)
    await Preflight().run(ctx)
    hosts = (machine / "etc/hosts").read_text()
    assert hosts.startswith("127.0.0.1\tlocalhost\n")  # Debian's lines kept
    assert f"{VM_ADDRESS}\t{name}\t# added by lifecycle" in hosts
    assert f"{name} did not resolve: added '{VM_ADDRESS} {name}' to /etc/hosts" in progress.messages()
    assert await Preflight().is_done(ctx)  # it resolves now: done, and a run adds no second line
    await Preflight().run(ctx)
    assert (machine / "etc/hosts").read_text() == hosts


async def test_an_endpoint_name_that_leads_elsewhere_is_refused(machine: Path) -> None:
    name = "api.lifecycle-preflight.invalid"
    hosts = machine / "etc/hosts"
    hosts.write_text(hosts.read_text() + f"203.0.113.7\t{name}\n")
    before = tree(machine)
    ctx, _ = preflight_ctx(with_k8s(step_config(machine), node_ip=VM_ADDRESS, endpoint_name=name), api_port=0)
    with pytest.raises(PermanentError) as raised:
        await Preflight().run(ctx)
    assert raised.value.code == "endpoint_not_local" and "resolves to 203.0.113.7" in raised.value.message
    assert tree(machine) == before


# ---- through the engine -------------------------------------------------------------------------------------


def engine_for(root: Path, **k8s: object) -> tuple[Engine, Bus]:
    config = make_config(root)
    k8s = {"etcd_metrics_port": 0, **k8s}  # 0: a free one (kubeadm's 2381 may be another test node's etcd)
    config = replace(config, kubernetes=replace(config.kubernetes, **k8s))
    plan: list[Step] = [Preflight(), *(FakeStep(name) for name in ("certs", "images", "binaries", "network",
                                                                   "kubeadm", "kubelet", "readiness", "addons"))]
    bus = Bus()
    engine = Engine(config=config, paths=HostPaths(root), ports=null_ports(), plan=plan, reset=fake_reset,
                    store=state_file(HostPaths(root)), bus=bus)
    return engine, bus


async def test_engine_detects_the_node_ip_when_unset_and_keeps_it_with_the_install(machine: Path) -> None:
    engine, bus = engine_for(machine, node_ip="", endpoint_name="kubernetes.lifecycle-preflight.invalid")
    sub = bus.subscribe("test")
    await engine.install(request_id="r1", version=None)
    await engine.wait_job()
    assert engine.state == State.RUNNING, engine.status().error
    saved = state_file(HostPaths(machine)).load()
    assert saved is not None and saved.cluster is not None and saved.cluster.node_ip == VM_ADDRESS
    assert f"{VM_ADDRESS}\tkubernetes.lifecycle-preflight.invalid" in (machine / "etc/hosts").read_text()
    progress = [e.data["message"] for e in drain_events(sub) if e.type == EventType.STEP_PROGRESS
                and e.data["state"] == "preflight"]
    assert any("added" in m and "/etc/hosts" in m for m in progress), progress
    await engine.shutdown()


async def test_engine_fails_in_preflight_with_every_problem_then_resumes_once_fixed(
    machine: Path, held_port: int
) -> None:
    broken = break_prerequisites(machine)
    before = tree(machine)
    engine, _ = engine_for(machine, node_ip="192.168.65.3", api_port=held_port)
    await engine.install(request_id="r1", version=None)
    await engine.wait_job()
    status = engine.status()
    assert (status.state, status.step) == ("failed", 1) and status.error is not None
    assert status.error.code == "node_ip_not_local"  # the address first: it is config; the rest is listed too
    assert {c["check"] for c in status.error.details["checks"]} == {
        "NodeIP", "Swap", "FileContent--proc-sys-net-ipv4-ip_forward", "FileExisting-conntrack", f"Port-{held_port}"}
    assert tree(machine) == before
    await engine.shutdown()
    # The machine is fixed and the address left to detection: the next install starts over and gets through.
    broken.repair()
    engine, _ = engine_for(machine, node_ip="", api_port=0, endpoint_name="localhost")
    await engine.install(request_id="r2", version=None)
    await engine.wait_job()
    assert engine.state == State.RUNNING, engine.status().error
    await engine.shutdown()


@pytest.mark.parametrize("problem", ["no directory", "bad manifest"])
async def test_addon_manifests_it_cannot_use_fail_the_preflight_and_nothing_is_written(
    machine: Path, tmp_path: Path, problem: str,
) -> None:
    """Found by hand: a config copied to another folder named `../deploy/addons` from there; the install ran every
    step, kubeadm's included, and failed in the last one. The manifests are config: preflight reads them."""
    addons = tmp_path / "addons"
    if problem == "bad manifest":
        addons.mkdir()
        (addons / "storage.yaml").write_text("kind: ConfigMap\nimage: ${NO_SUCH_IMAGE}\n")
    config = step_config(machine)
    config = replace(config, addons=replace(config.addons, manifests_dir=addons))
    before = tree(machine)
    ctx, progress = preflight_ctx(config, api_port=0)
    assert not await Preflight().is_done(ctx)
    with pytest.raises(PermanentError) as raised:
        await Preflight().run(ctx)
    assert raised.value.code == "bad_manifest"
    checks = raised.value.details["checks"]
    assert isinstance(checks, list) and [c["check"] for c in checks] == ["AddonManifests"]
    said = {"no directory": f"addons.manifests_dir {addons} is not a directory",
            "bad manifest": "unknown placeholder ${NO_SUCH_IMAGE}"}[problem]
    assert said in raised.value.message
    assert tree(machine) == before and not progress.calls
