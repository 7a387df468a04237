"""Pod sandboxes on the simulated machine (findings 6, 10): every pod, static ones included, needs a sandbox from
cri-dockerd. It fails, as on a real node, while the running cri-dockerd's pause image is not in the engine, and
while the engine is on the systemd cgroup driver and the kubelet on cgroupfs; the pod then never gets a container
and the kubelet logs FailedCreatePodSandBox with the runtime's own words."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_kubelet_static import kubelet, records, write_config, write_manifest
from test_kubelet_support import kill_group, scratch_images, wait_for

from simnode.host import prepare_host
from simnode.kubelet.runtime import stop_pod_processes
from simnode.paths import NodeRoot

DROP_IN = "etc/systemd/system/cri-docker.service.d/10-lifecycle.conf"


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, str]]:
    with scratch_images(["pause", "web"]) as refs:
        yield refs


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "node"
    prepare_host(root)
    yield root
    stop_pod_processes(NodeRoot(root), grace_s=2)


def set_pause_image(root: Path, image: str) -> None:
    """What the lifecycle service does (lifecycle/hostunits.py): a drop-in, daemon-reload, restart."""
    drop_in = root / DROP_IN
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text("[Service]\nExecStart=\nExecStart=/usr/bin/cri-dockerd --container-runtime-endpoint fd:// "
                       f"--pod-infra-container-image={image}\n")
    for args in (["daemon-reload"], ["restart", "cri-docker.service"]):
        subprocess.run([str(root / "usr/bin/systemctl"), *args], check=True, capture_output=True, timeout=30)


def created(root: Path, pod: str) -> bool:
    containers: dict[str, Any] = (records(root).get(f"kube-system/{pod}") or {}).get("containers") or {}
    return any(c.get("created_at") is not None for c in containers.values())


def log_text(root: Path) -> str:
    path = root.parent / "kubelet.log"
    return path.read_text() if path.exists() else ""


def test_no_sandbox_until_the_running_cri_dockerd_has_its_pause_image(root: Path, images: dict[str, str]) -> None:
    write_config(root)
    write_manifest(root, "web", images["web"], ["sleep"])
    proc = kubelet(root)
    try:
        wanted = ('FailedCreatePodSandBox pod="kube-system/web": Failed to create pod sandbox: rpc error: code = '
                  'Unknown desc = failed pulling image "registry.k8s.io/pause:3.9"')
        wait_for(lambda: wanted in log_text(root), timeout_s=20, what="FailedCreatePodSandBox for the pause image")
        assert not created(root, "web")
        # A drop-in alone changes nothing: the running cri-dockerd keeps the flags it was started with.
        (root / DROP_IN).parent.mkdir(parents=True)
        (root / DROP_IN).write_text(f"[Service]\nExecStart=\nExecStart=/usr/bin/cri-dockerd "
                                    f"--pod-infra-container-image={images['pause']}\n")
        time.sleep(2.5)  # longer than the kubelet's sandbox check period
        assert not created(root, "web")
        set_pause_image(root, images["pause"])
        wait_for(lambda: created(root, "web"), timeout_s=20, what="the pod's container once the sandbox exists")
    finally:
        kill_group(proc)


def test_engine_on_systemd_and_kubelet_on_cgroupfs_fail_every_sandbox(root: Path, images: dict[str, str]) -> None:
    set_pause_image(root, images["pause"])
    faults = root / "etc/simnode/faults.json"
    faults.parent.mkdir(parents=True, exist_ok=True)
    faults.write_text(json.dumps({"engine_cgroup_driver": "systemd"}))
    write_config(root)  # no cgroupDriver: the kubelet's default, cgroupfs
    write_manifest(root, "web", images["web"], ["sleep"])
    proc = kubelet(root)
    try:
        wanted = ('Failed to create pod sandbox: rpc error: code = Unknown desc = failed to create a sandbox for pod '
                  '"web": Error response from daemon: cgroup-parent for systemd cgroup should be a valid slice named '
                  'as "xxx.slice"')
        wait_for(lambda: wanted in log_text(root), timeout_s=20, what="FailedCreatePodSandBox for the cgroup parent")
        assert not created(root, "web")
    finally:
        kill_group(proc)

    # The same driver on both sides (what the lifecycle service writes): the sandbox is made.
    write_config(root, cgroupDriver="systemd")
    proc = kubelet(root)
    try:
        wait_for(lambda: created(root, "web"), timeout_s=20, what="the pod's container with matching drivers")
    finally:
        kill_group(proc)


def test_a_bad_cgroup_driver_knob_is_reported(root: Path) -> None:
    from simnode.faults import FaultsFileError, load_faults

    faults = root / "etc/simnode/faults.json"
    faults.parent.mkdir(parents=True, exist_ok=True)
    faults.write_text(json.dumps({"engine_cgroup_driver": "cgroupv2"}))
    with pytest.raises(FaultsFileError, match="engine_cgroup_driver"):
        load_faults(faults)
