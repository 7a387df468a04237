"""The kubeadm, kubelet, readiness and addons steps and the reset routine, for real, on the simulated node.

A root is prepared by the certs, images and binaries steps (images from `sim_images` in the local registry);
then the steps run the node's own kubeadm and kubelet, and real kubectl looks at the result. Every process
started under a test's root is stopped in teardown (reset, then a sweep of whatever still runs from the root).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
from conftest import SIM_REPO, SimImages, free_port

from lifecycle.adapters.docker import DockerEngine
from lifecycle.adapters.kube import KubernetesApiFactory
from lifecycle.adapters.kubelet import ProcessKubeletSupervisor
from lifecycle.adapters.process import SubprocessRunner
from lifecycle.config import AddonsConfig, Config, DockerConfig, KubernetesConfig, ReadinessConfig, VersionImages
from lifecycle.errors import CommandError, PermanentError, TemporaryError
from lifecycle.hostunits import configure_cri_dockerd
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.step import ClusterParams, StepContext
from simnode.host import install_kubelet_package_units, prepare_host
from states.addons import Addons
from states.binaries import Binaries
from states.certs import Certs
from states.images import Images
from states.kubeadm import Kubeadm
from states.kubelet import Kubelet, kubelet_argv
from states.network import CONF_NAME, Network
from states.readiness import Readiness, wait_for_components
from states.reset import reset

REPO = Path(__file__).resolve().parents[2]
VERSION = "v1.31.4"
REGISTRY_REPO = SIM_REPO
DOCKER_HOST = os.environ.get("DOCKER_HOST") or "unix:///tmp/lifecycle-services/docker/docker.sock"
LOG = structlog.get_logger("e2e")
# As in simnode/lifecycle.toml: the simulated image carries Docker Desktop's kind of tag.
BINARIES_IMAGE = ("{repo}/desktop-kubernetes:kubernetes-{version}-cni-{cni}-critools-{critools}"
                  "-cri-dockerd-{cri_dockerd}-1-debian")


@dataclass
class Node:
    config: Config
    paths: HostPaths
    cluster: ClusterParams
    ports: Ports
    progress: list[tuple[str, str]] = field(default_factory=list)  # (step, message)

    def ctx(self, step: str, *, timeout_s: float | None = None) -> StepContext:
        def progress(message: str, *, current: float | None = None, total: float | None = None,
                     unit: str | None = None) -> None:
            self.progress.append((step, message))

        budget_s = timeout_s if timeout_s is not None else self.config.steps[step].timeout_s
        deadline = asyncio.get_running_loop().time() + budget_s
        return StepContext(self.config, self.paths, self.cluster, self.ports, "e2e", deadline, LOG, progress)

    def messages(self, step: str) -> list[str]:
        return [m for s, m in self.progress if s == step]


def _config(root: Path, *, repo: str, binaries_image: str) -> Config:
    return Config(
        node_name="simnode",
        root=root,
        kubernetes=KubernetesConfig(
            version=VERSION,
            image_repository=repo,
            binaries_image=binaries_image,
            versions={VERSION: VersionImages(etcd="3.5.15-0", coredns="v1.11.3", pause="3.10", cni="v1.6.0",
                                             critools="v1.31.1", cri_dockerd="v0.3.16")},
            node_ip="127.0.0.1",
            endpoint_name="localhost",  # as in simnode/lifecycle.toml
            cri_socket=DOCKER_HOST,
        ),
        docker=DockerConfig(host=DOCKER_HOST),
        addons=AddonsConfig(manifests_dir=REPO / "deploy" / "addons",
                            storage_provisioner_image="{repo}/rancher/local-path-provisioner:v0.0.37",
                            storage_helper_image="{repo}/library/busybox:1.37.0"),
    )


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[Callable[..., Node]]:
    """Builds nodes under tmp_path; tears each down (reset, then kill what still runs from its root)."""
    nodes: list[Node] = []

    def make(name: str, *, repo: str = REGISTRY_REPO, binaries_image: str = BINARIES_IMAGE) -> Node:
        root = tmp_path / name
        prepare_host(root)
        paths = HostPaths(root)
        ports = Ports(
            docker=DockerEngine(DOCKER_HOST),
            commands=SubprocessRunner(),
            kubelet=ProcessKubeletSupervisor(pid_file=paths.state_dir / "kubelet.pid", log=LOG),
            kube=KubernetesApiFactory(),
        )
        node = Node(_config(root, repo=repo, binaries_image=binaries_image), paths,
                    ClusterParams(VERSION, free_port(), free_port()), ports)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        try:
            await reset(node.ctx("kubeadm", timeout_s=60))
        finally:
            _kill_processes_under(node.paths.root)
            await node.ports.docker.close()


async def _prepare(node: Node, *, pull: bool, network: bool = True) -> None:
    steps: list[Certs | Images | Binaries | Network] = [Certs(), Images(), Binaries()] if pull else [Certs(),
                                                                                                    Binaries()]
    if network:
        steps.append(Network())
    for step in steps:
        ctx = node.ctx(step.name)
        if not await step.is_done(ctx):
            await step.run(ctx)
        assert await step.is_done(ctx), f"{step.name} not done after run"
    if not pull:
        await configure_cri_dockerd(node.ctx("images"))  # what the skipped images state does after its pulls


def _kubelets(root: Path) -> list[int]:
    """Kubelet processes of this root (pod processes run from the same zipapp but carry SIMNODE_POD)."""
    found = []
    for pid in _pids_under(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(root / "usr/bin/kubelet").encode() in cmdline and not any(e.startswith(b"SIMNODE_POD=")
                                                                          for e in environ):
            found.append(pid)
    return found


def _systemctl(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(node.paths.under("/usr/bin/systemctl")), *args], capture_output=True, text=True,
                          timeout=30, check=False)


async def test_a_packaged_kubelet_service_is_masked_so_kubeadm_starts_no_second_kubelet(
    sim_images: SimImages, make_node: Callable[..., Node]
) -> None:
    # Finding 13: kubeadm's kubelet-start runs `systemctl restart kubelet`; with the kubelet .deb's unit enabled
    # that is a second kubelet next to the one the service supervises.
    node = make_node("distro")
    install_kubelet_package_units(node.paths.root)
    assert _systemctl(node, "is-enabled", "kubelet").stdout.strip() == "enabled"
    await _prepare(node, pull=True)

    ctx = node.ctx("kubeadm")
    await Kubeadm().run(ctx)
    assert _kubelets(node.paths.root) == [], "kubeadm's kubelet-start started kubelet.service"
    assert _systemctl(node, "is-active", "kubelet").returncode == 3
    assert _systemctl(node, "is-enabled", "kubelet").stdout.strip() == "masked"
    assert "masked kubelet.service: the service supervises the kubelet (kubeadm cannot start another)" in \
        node.messages("kubeadm")

    await Kubelet().run(node.ctx("kubelet"))
    assert len(_kubelets(node.paths.root)) == 1
    # kubeadm reset's `systemctl stop kubelet` meets a masked unit and leaves ours to the service.
    await reset(node.ctx("kubeadm", timeout_s=60))
    assert _kubelets(node.paths.root) == []


async def test_kubeadm_to_addons_brings_up_a_cluster_that_kubectl_sees(
    sim_images: SimImages, make_node: Callable[..., Node]
) -> None:
    node = make_node("main")
    await _prepare(node, pull=True)

    for step in (Kubeadm(), Kubelet(), Readiness(), Addons()):
        ctx = node.ctx(step.name)
        assert not await step.is_done(ctx), f"{step.name} done before it ran"
        await step.run(ctx)
        assert await step.is_done(ctx), f"{step.name} not done after run"

    kubeadm_lines = node.messages("kubeadm")
    assert "kubeadm init phase control-plane all" in kubeadm_lines
    assert any(m.startswith('[control-plane] Creating static Pod manifest for "kube-apiserver"') for m in kubeadm_lines)
    assert {"kube-apiserver ready", "kube-controller-manager ready", "coredns ready"} <= set(node.messages("readiness"))
    # Issue 7 finding 1: the service waits itself (kubeadm v1.31 has no `init phase wait-control-plane`).
    readiness = node.messages("readiness")
    kubelet_wait = f"the kubelet (http://127.0.0.1:{node.cluster.kubelet_healthz_port}/healthz)"
    api_wait = f"the API server (https://localhost:{node.cluster.api_port}/readyz, admin.conf's credentials)"
    assert readiness[:4] == [f"waiting for {kubelet_wait}", readiness[1], f"waiting for {api_wait}", readiness[3]]
    assert readiness[1].startswith(f"{kubelet_wait} answered ok after ")
    assert readiness[3].startswith(f"{api_wait} answered ok after ")
    assert "kubeadm init phase wait-control-plane" not in readiness
    assert "Deployment local-path-storage/local-path-provisioner available" in node.messages("addons")

    pods = _kubectl_json(node, "get", "pods", "-n", "kube-system")
    phases = {p["metadata"]["name"]: p["status"].get("phase") for p in pods["items"]}
    phases.update({p["metadata"]["name"]: p["status"].get("phase")
                   for p in _kubectl_json(node, "get", "pods", "-n", "local-path-storage")["items"]})
    for prefix in ("kube-apiserver-simnode", "kube-controller-manager-simnode", "etcd-simnode", "coredns-",
                   "local-path-provisioner-"):
        matching = [phase for name, phase in phases.items() if name.startswith(prefix)]
        assert matching and all(p == "Running" for p in matching), (prefix, phases)
    table = _kubectl(node, "get", "pods", "-n", "kube-system")
    assert "kube-apiserver-simnode" in table and "Running" in table
    storage_class = _kubectl_json(node, "get", "storageclass", "local-path")
    assert storage_class["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"

    # Reset: the kubelet and every static pod stop, generated files go, images and binaries stay.
    ctx = node.ctx("kubeadm", timeout_s=60)
    await reset(ctx)
    assert not node.ports.kubelet.is_running()
    assert _pids_under(node.paths.root) == []
    assert not node.paths.pki_dir.exists()
    assert not node.paths.admin_conf.exists()
    assert not node.paths.kubeadm_config.exists()
    assert not list(node.paths.state_dir.glob("*.stamp.json"))
    assert not list(node.paths.manifests_dir.glob("*.yaml"))
    assert node.paths.binary("kubeadm").is_file()
    assert not await Kubeadm().is_done(ctx)
    await reset(ctx)  # idempotent


async def test_kubeadm_failure_and_retry_then_readiness_names_the_missing_coredns_image(
    sim_images: SimImages, make_node: Callable[..., Node], private_repo: str
) -> None:
    node = make_node("faulty", repo=private_repo, binaries_image=BINARIES_IMAGE.replace("{repo}", REGISTRY_REPO))
    await _prepare(node, pull=False)
    faults = node.paths.under("/etc/simnode/faults.json")
    faults.parent.mkdir(parents=True, exist_ok=True)
    faults.write_text(json.dumps({"kubeadm_fail": {"phase": "control-plane", "message": "boom"}}))

    kubeadm = Kubeadm()
    ctx = node.ctx("kubeadm")
    with pytest.raises(CommandError) as caught:
        await kubeadm.run(ctx)
    assert "boom" in caught.value.message
    assert caught.value.exit_code != 0 and caught.value.retryable
    assert (node.paths.manifests_dir / "etcd.yaml").exists()  # the phases before control-plane ran

    # before_retry: the node is reset, but our PKI and kubeconfigs survive byte for byte.
    kept = {p: _sha256(p) for p in (node.paths.pki_dir / "ca.crt", node.paths.pki_dir / "ca.key", node.paths.admin_conf,
                                    node.paths.kubeconfig("kubelet.conf"))}
    faults.unlink()
    await kubeadm.before_retry(ctx)
    assert not list(node.paths.manifests_dir.glob("*.yaml"))
    assert {p: _sha256(p) for p in kept} == kept
    await kubeadm.run(ctx)
    assert await kubeadm.is_done(ctx)

    kubelet_ctx = node.ctx("kubelet")
    await Kubelet().run(kubelet_ctx)

    # kubeadm's API phases, waiting for the API server alone: coredns cannot get Ready, its image is missing.
    readiness_ctx = node.ctx("readiness")
    await Readiness().run(replace(readiness_ctx, config=replace(
        node.config, readiness=ReadinessConfig(components=("kube-apiserver",)))))

    # The wait the readiness state does, with a deadline a few seconds away.
    started = time.monotonic()
    with pytest.raises(PermanentError) as not_ready:
        await wait_for_components(node.ctx("readiness", timeout_s=8), components=("kube-apiserver", "coredns"))
    assert 6 <= time.monotonic() - started < 8, "the wait must last until shortly before its deadline, not beyond"
    error = not_ready.value
    assert error.code == "not_ready"
    assert "coredns: 0/2 ready (" in error.message
    assert "ErrImagePull" in error.message or "ImagePullBackOff" in error.message
    assert set(error.details["components"]) == {"coredns"}  # type: ignore[call-overload]
    assert not await Readiness().is_done(readiness_ctx)


async def test_readiness_names_the_kubelet_or_the_api_server_that_does_not_answer(
    sim_images: SimImages, make_node: Callable[..., Node]
) -> None:
    """Issue 7 finding 1: the service's own wait-control-plane fails naming what it waited for and its last answer."""
    node = make_node("waits")
    await _prepare(node, pull=True)
    await Kubeadm().run(node.ctx("kubeadm"))
    faults = node.paths.under("/etc/simnode/faults.json")
    faults.parent.mkdir(parents=True, exist_ok=True)

    # A kubelet that runs but never serves /healthz.
    faults.write_text(json.dumps({"delays_s": {"kubelet_start": 3600}}))
    await node.ports.kubelet.start(kubelet_argv(node.paths), log_path=node.paths.log_dir / "kubelet.log")
    healthz_url = f"http://127.0.0.1:{node.cluster.kubelet_healthz_port}/healthz"
    with pytest.raises(TemporaryError) as no_kubelet:
        await Readiness().run(node.ctx("readiness", timeout_s=5))
    assert no_kubelet.value.code == "kubelet_not_healthy"
    assert no_kubelet.value.message.startswith(f"the kubelet ({healthz_url}) did not answer ok within ")
    assert "(last: " in no_kubelet.value.message and "last: not asked yet" not in no_kubelet.value.message
    assert node.messages("readiness") == [f"waiting for the kubelet ({healthz_url})"]
    assert not list(node.paths.state_dir.glob("readyz-credentials-*"))

    # A healthy kubelet, but an API server whose /readyz never says ok.
    await node.ports.kubelet.stop()
    faults.write_text(json.dumps({"apiserver_never_ready": True}))
    await Kubelet().run(node.ctx("kubelet"))
    # The API server's start is not what is tested: once it answers (500), a short wait says what it answered.
    assert "etcd-readiness failed" in await _readyz(node, until_answered=True, timeout_s=60)
    node.progress.clear()
    with pytest.raises(TemporaryError) as no_api:
        await Readiness().run(node.ctx("readiness", timeout_s=8))
    error = no_api.value
    assert error.code == "apiserver_not_ready"
    readyz_url = f"https://localhost:{node.cluster.api_port}/readyz"
    assert error.message.startswith(f"the API server ({readyz_url}, admin.conf's credentials) did not answer ok")
    assert "500" in error.message and "[-]etcd-readiness failed: reason withheld" in error.message, error.message
    assert error.details["last"] in error.message
    # The wait says what it waits for, then every 5 s that it still waits, with the last answer and the tries.
    api_messages = [m for m in node.messages("readiness") if "the API server" in m]
    assert api_messages[0] == f"waiting for the API server ({readyz_url}, admin.conf's credentials)"
    assert all(m.startswith(f"still waiting for the API server ({readyz_url}") and " tries in " in m
               for m in api_messages[1:]), api_messages
    assert not list(node.paths.state_dir.glob("readyz-credentials-*"))  # admin.conf's key left no copy
async def test_the_node_is_ready_only_with_the_pod_network_and_readiness_names_it(
    sim_images: SimImages, make_node: Callable[..., Node]
) -> None:
    node = make_node("net")
    await _prepare(node, pull=True, network=False)  # a kubelet started before the network step ever ran
    for step in (Kubeadm(), Kubelet()):
        await step.run(node.ctx(step.name))
    assert await _readyz(node, until_answered=False, timeout_s=60) == "ok"  # the API server's start is not timed
    only_apiserver = replace(node.config, readiness=ReadinessConfig(components=("kube-apiserver",)))
    with pytest.raises(TemporaryError) as not_ready:
        # kubeadm's API phases pass (static pods are on the host network); the wait does not. The budget: the
        # five phases (a few seconds), then a wait that lasts until the deadline.
        await Readiness().run(replace(node.ctx("readiness", timeout_s=20), config=only_apiserver))
    message = not_ready.value.message
    assert ("node simnode NotReady: container runtime network not ready: NetworkReady=false reason:"
            "NetworkPluginNotReady message:docker: network plugin is not ready: cni config uninitialized") in message
    assert "/etc/cni/net.d" in message and not_ready.value.details["node"].startswith("node simnode NotReady")
    assert any(m.startswith("node simnode NotReady: container runtime network not ready") for m in
               node.messages("readiness")), "the wait says why while it waits"
    assert _node_ready(node) == "False"
    assert {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"} in _node(node)["spec"]["taints"]
    assert " NotReady " in _kubectl(node, "get", "nodes")
    with pytest.raises(TemporaryError, match=r"node simnode NotReady.*coredns: 0/2 ready \(Unschedulable\)"):
        await wait_for_components(node.ctx("readiness", timeout_s=5), components=("coredns",))

    network, ctx = Network(), node.ctx("network")
    assert not await network.is_done(ctx)
    await network.run(ctx)
    assert await network.is_done(ctx)
    conflist = json.loads(node.paths.under(f"/etc/cni/net.d/{CONF_NAME}").read_text())
    bridge = conflist["plugins"][0]
    assert (bridge["type"], bridge["isDefaultGateway"], bridge["ipMasq"], bridge["hairpinMode"]) == (
        "bridge", True, True, True)
    assert bridge["ipam"] == {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/16"}]]}
    await wait_for_components(node.ctx("readiness", timeout_s=30), components=("kube-apiserver", "coredns"))
    assert _node_ready(node) == "True"
    assert not any(t["key"].startswith("node.kubernetes.io/") for t in _node(node)["spec"].get("taints") or [])
    assert " Ready " in _kubectl(node, "get", "nodes")

    # cri-dockerd keeps a network it loaded when its file goes (network/cni/cni.go syncNetworkConfig); the next
    # cri-dockerd start (here: the kubelet's, which hosts it) finds none and the node is NotReady again.
    node.paths.under(f"/etc/cni/net.d/{CONF_NAME}").unlink()
    await asyncio.sleep(2.5)
    assert _node_ready(node) == "True"
    assert not await network.is_done(ctx), "an install would write the file again"
    restarts = node.ports.kubelet.restarts
    os.kill(_kubelet_pid(node), signal.SIGKILL)
    assert await _eventually(lambda: node.ports.kubelet.restarts > restarts and node.ports.kubelet.is_running(),
                             timeout_s=30)
    assert await _eventually(lambda: _node_ready(node) == "False", timeout_s=30)
    assert " NotReady " in _kubectl(node, "get", "nodes")
    assert not await Readiness().is_done(node.ctx("readiness")), "running coredns pods do not make a ready node"
    with pytest.raises(TemporaryError, match=r"^not ready before the deadline: node simnode NotReady: container "
                                             r"runtime network not ready.*cni config uninitialized"):
        await wait_for_components(node.ctx("readiness", timeout_s=5), components=("coredns",))


async def test_the_network_step_fails_naming_missing_or_unusable_plugins(
    sim_images: SimImages, make_node: Callable[..., Node]
) -> None:
    node = make_node("noplugins")
    without = tuple(p for p in node.config.kubernetes.binaries if p not in ("/opt/cni/bin/portmap",
                                                                             "/opt/cni/bin/loopback"))
    node.config = replace(node.config, kubernetes=replace(node.config.kubernetes, binaries=without))
    await _prepare(node, pull=False, network=False)
    node.paths.under("/opt/cni/bin/bridge").chmod(0o644)
    network, ctx = Network(), node.ctx("network")
    with pytest.raises(PermanentError) as missing:
        await network.run(ctx)
    assert missing.value.code == "cni_plugins_missing"
    assert missing.value.details["problems"] == [
        "/opt/cni/bin/bridge is not executable", "/opt/cni/bin/portmap is missing", "/opt/cni/bin/loopback is missing",
    ]
    assert not node.paths.under("/etc/cni/net.d").exists(), "nothing written"
    assert not await network.is_done(ctx)


@pytest.fixture
def private_repo(sim_images: SimImages) -> Iterator[str]:
    """The simulated images tagged locally under a unique repository, coredns left out."""
    repo = f"{REGISTRY_REPO}/lifecycle-steps-{uuid.uuid4().hex[:8]}"
    tagged: list[str] = []
    binaries = sim_images.binaries_image(VERSION)
    _docker("pull", binaries)
    try:
        for component, ref in sim_images.components[VERSION].items():
            if component == "coredns":
                continue
            _docker("pull", ref)
            target = f"{repo}/{ref.rsplit('/', 1)[1]}"
            _docker("tag", ref, target)
            tagged.append(target)
        yield repo
    finally:
        for ref in tagged:
            _docker("rmi", ref, check=False)  # only untags: the shared images stay


# ---- helpers ---------------------------------------------------------------------------------------------


def _node(node: Node) -> dict[str, Any]:
    return cast(dict[str, Any], _kubectl_json(node, "get", "node", "simnode"))


def _node_ready(node: Node) -> str:
    conditions = _node(node)["status"]["conditions"]
    return str(next(c["status"] for c in conditions if c["type"] == "Ready"))


def _kubelet_pid(node: Node) -> int:
    return int(json.loads((node.paths.state_dir / "kubelet.pid").read_text())["pid"])


async def _readyz(node: Node, *, until_answered: bool, timeout_s: float) -> str:
    """The API server's /readyz answer (kubectl, admin.conf) once it says ok, or once it answers at all."""
    give_up = time.monotonic() + timeout_s
    while True:
        done = await asyncio.to_thread(
            subprocess.run, ["kubectl", f"--kubeconfig={node.paths.admin_conf}", "get", "--raw", "/readyz",
                             "--request-timeout=5s"], capture_output=True, text=True, timeout=30)
        if done.returncode == 0 or (until_answered and "readyz check failed" in done.stderr):
            return done.stdout if done.returncode == 0 else done.stderr
        assert time.monotonic() < give_up, f"/readyz: {done.stdout}{done.stderr}"
        await asyncio.sleep(0.3)


async def _eventually(check: Callable[[], bool], *, timeout_s: float) -> bool:
    give_up = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > give_up:
            return False
        await asyncio.sleep(0.3)
    return True


def _docker(*args: str, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], env={**os.environ, "DOCKER_HOST": DOCKER_HOST},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 or not check, f"docker {' '.join(args)}: {done.stderr}"
    return done.stdout


def _kubectl(node: Node, *args: str) -> str:
    done = subprocess.run(["kubectl", f"--kubeconfig={node.paths.admin_conf}", *args],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def _kubectl_json(node: Node, *args: str) -> dict[str, object]:
    parsed: dict[str, object] = json.loads(_kubectl(node, *args, "-o", "json"))
    return parsed


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pids_under(root: Path) -> list[int]:
    """Live processes whose command line names a path under `root` (kubelet, static pods)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z" and f"{root}/" in cmdline:
            found.append(int(entry.name))
    return found


def _kill_processes_under(root: Path) -> None:
    for pid in _pids_under(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
