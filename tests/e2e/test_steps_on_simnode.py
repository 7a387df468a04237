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

import pytest
import structlog
from conftest import SIM_REPO, SimImages, free_port

from lifecycle.adapters.docker import DockerEngine
from lifecycle.adapters.kube import KubernetesApiFactory
from lifecycle.adapters.kubelet import ProcessKubeletSupervisor
from lifecycle.adapters.process import SubprocessRunner
from lifecycle.config import AddonsConfig, Config, DockerConfig, KubernetesConfig, ReadinessConfig, VersionImages
from lifecycle.errors import CommandError, PermanentError
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.step import ClusterParams, StepContext
from simnode.host import prepare_host
from states.addons import Addons
from states.binaries import Binaries
from states.certs import Certs
from states.images import Images
from states.kubeadm import Kubeadm
from states.kubelet import Kubelet
from states.readiness import Readiness, wait_for_components
from states.reset import reset

REPO = Path(__file__).resolve().parents[2]
VERSION = "v1.31.4"
REGISTRY_REPO = SIM_REPO
DOCKER_HOST = os.environ.get("DOCKER_HOST") or "unix:///tmp/lifecycle-services/docker/docker.sock"
LOG = structlog.get_logger("e2e")


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
            versions={VERSION: VersionImages(etcd="3.5.15-0", coredns="v1.11.3", pause="3.10")},
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

    def make(name: str, *, repo: str = REGISTRY_REPO, binaries_image: str = "{repo}/kube-binaries:{version}") -> Node:
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


async def _prepare(node: Node, *, pull: bool) -> None:
    steps = [Certs(), Images(), Binaries()] if pull else [Certs(), Binaries()]
    for step in steps:
        ctx = node.ctx(step.name)
        if not await step.is_done(ctx):
            await step.run(ctx)
        assert await step.is_done(ctx), f"{step.name} not done after run"


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
    node = make_node("faulty", repo=private_repo, binaries_image=f"{REGISTRY_REPO}/kube-binaries:{{version}}")
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
