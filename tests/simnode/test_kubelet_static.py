"""Kubelet stand-in without an API server: flags, config, /healthz, static pods as real processes against
the real Docker Engine (image checks), restarts, adoption after a kubelet restart, stop_pod_processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_kubelet_support import (
    DOCKER_SOCK,
    PYTHON,
    REPO,
    free_port,
    kill_group,
    pid_alive,
    scratch_images,
    start_tool,
    wait_for,
)

from simnode.kubelet.runtime import stop_pod_processes
from simnode.paths import NodeRoot

RUNTIME = f"--container-runtime-endpoint=unix://{DOCKER_SOCK}"


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, str]]:
    with scratch_images(["etcd", "kube-scheduler"]) as refs:
        yield refs


def write_config(root: Path, **extra: Any) -> None:
    cfg = {"apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
           "staticPodPath": "/etc/kubernetes/manifests", "healthzPort": 0, **extra}
    path = root / "var/lib/kubelet/config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))


def write_manifest(root: Path, name: str, image: str, command: list[str], **spec: Any) -> Path:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "kube-system"},
           "spec": {"hostNetwork": True, "containers": [{"name": name, "image": image, "command": command}], **spec}}
    path = root / f"etc/kubernetes/manifests/{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pod))
    return path


def records(root: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((root / "var/lib/kubelet/simnode/pods.json").read_text())
    except FileNotFoundError:
        return {}
    return data


def container(root: Path, pod: str, name: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = records(root)[f"kube-system/{pod}"]["containers"][name or pod]
    return c


def running_pid(root: Path, pod: str) -> int | None:
    try:
        pid = container(root, pod)["pid"]
    except KeyError:
        return None
    return pid if isinstance(pid, int) and pid_alive(pid) else None


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "node"
    write_config(root)
    yield root
    stop_pod_processes(NodeRoot(root), grace_s=2)


def kubelet(root: Path, *extra: str) -> subprocess.Popen[bytes]:
    return start_tool("kubelet", ["--config=/var/lib/kubelet/config.yaml", RUNTIME, *extra], root,
                      root.parent / "kubelet.log")


def run_kubelet(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SIMNODE_ROOT=str(root), PYTHONPATH=str(REPO))
    return subprocess.run([PYTHON, "-m", "simnode", "kubelet", *args], env=env, capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus=1"], "unknown flag: --bogus"),
        (["--kubeconfig"], "flag needs an argument: --kubeconfig"),
        (["stray"], "unexpected argument 'stray'"),
        (["--node-ip=not-an-ip"], "invalid --node-ip"),
        (["--v=high"], "invalid value 'high' for --v"),
        (["--config", "/var/lib/kubelet/missing.yaml"], "missing.yaml: no such file"),
        (["--fail-swap-on=maybe"], "invalid value 'maybe' for boolean flag --fail-swap-on"),
    ],
)
def test_bad_flags_exit_1(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_kubelet(tmp_path, *args)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr


def test_bad_config_files_exit_1(tmp_path: Path) -> None:
    cfg = tmp_path / "var/lib/kubelet/config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n")
    result = run_kubelet(tmp_path, "--config=/var/lib/kubelet/config.yaml")
    assert result.returncode == 1
    assert "expected kind KubeletConfiguration" in result.stderr
    cfg.write_text("kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1\nhealthzPort: x\n")
    result = run_kubelet(tmp_path, "--config", str(cfg))  # an already-rooted path is accepted too
    assert result.returncode == 1
    assert "healthzPort must be a int" in result.stderr
    cfg.write_text("kind: [unclosed\n")
    assert "not valid YAML" in run_kubelet(tmp_path, "--config=/var/lib/kubelet/config.yaml").stderr


def test_unreachable_runtime_exits_1(tmp_path: Path) -> None:
    write_config(tmp_path)
    result = run_kubelet(tmp_path, "--config=/var/lib/kubelet/config.yaml",
                         f"--container-runtime-endpoint=unix://{tmp_path}/nothing.sock")
    assert result.returncode == 1
    assert "validate service connection" in result.stderr and "nothing.sock" in result.stderr


def test_swap_on_stops_the_kubelet_unless_fail_swap_on_is_false(tmp_path: Path) -> None:
    swaps = tmp_path / "proc/swaps"
    swaps.parent.mkdir(parents=True)
    swaps.write_text("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/swapfile   file   1048572   0   -2\n")
    write_config(tmp_path)
    nowhere = f"--container-runtime-endpoint=unix://{tmp_path}/nothing.sock"
    result = run_kubelet(tmp_path, "--config=/var/lib/kubelet/config.yaml", nowhere)
    assert result.returncode == 1
    assert ("failed to run Kubelet: running with swap on is not supported, please disable swap! or set "
            "--fail-swap-on flag to false. /proc/swaps contained: [Filename") in result.stderr
    assert "/swapfile" in result.stderr and "validate service connection" not in result.stderr
    for allowed in (["--fail-swap-on=false"], []):  # the flag, or failSwapOn: false in the config file
        if not allowed:
            write_config(tmp_path, failSwapOn=False)
        result = run_kubelet(tmp_path, "--config=/var/lib/kubelet/config.yaml", nowhere, *allowed)
        assert result.returncode == 1 and "running with swap on" not in result.stderr
        assert "validate service connection" in result.stderr  # past the swap check: stops at the runtime
    swaps.write_text("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")  # header only: swap off
    write_config(tmp_path)
    result = run_kubelet(tmp_path, "--config=/var/lib/kubelet/config.yaml", nowhere)
    assert "running with swap on" not in result.stderr and "validate service connection" in result.stderr


def test_healthz_and_sigterm(tmp_path: Path) -> None:
    port = free_port()
    write_config(tmp_path, healthzPort=port, healthzBindAddress="127.0.0.1")
    (tmp_path / "etc/simnode").mkdir(parents=True)
    (tmp_path / "etc/simnode/faults.json").write_text(json.dumps({"delays_s": {"kubelet_start": 2.0}}))
    started = time.monotonic()
    # Real-kubelet flags in both forms, including ones that are accepted and ignored.
    proc = kubelet(tmp_path, "--node-ip", "10.1.2.3", "--hostname-override=n1", "--fail-swap-on=false",
                   "--cgroup-driver", "systemd", "--pod-infra-container-image=x/pause:3.10", "--v=2")
    try:
        body = wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read(),
                        timeout_s=15, what="/healthz")
        assert body == b"ok"
        assert time.monotonic() - started >= 2.0, "/healthz answered before the kubelet_start delay"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        kill_group(proc)


def test_static_pod_lifecycle(node: Path, images: dict[str, str]) -> None:
    write_manifest(node, "etcd", images["etcd"], ["etcd", "--data-dir=/var/lib/etcd", "--name=n1"])
    write_manifest(node, "sleeper", images["etcd"], ["sleep", "3600"])
    missing = images["etcd"].replace("/etcd:", "/nope:")
    write_manifest(node, "broken", missing, ["etcd"])
    proc = kubelet(node)
    try:
        pid = wait_for(lambda: running_pid(node, "etcd"), timeout_s=15, what="etcd process")
        wait_for(lambda: (node / "var/lib/etcd/member").is_dir(), timeout_s=10, what="etcd's re-rooted data dir")
        env = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"SIMNODE_POD=kube-system/etcd/etcd" in env
        assert (node / "var/log/pods/kube-system_etcd/etcd.log").read_text().count("start etcd") == 1
        # Unknown command: a sleeping container, no process. Missing image: never started.
        wait_for(lambda: container(node, "sleeper")["created_at"], timeout_s=5, what="sleeper created")
        assert container(node, "sleeper")["pid"] is None
        assert container(node, "broken")["image_id"] is None and container(node, "broken")["pid"] is None

        # The process dies: restarted with a new pid and a restart counted.
        os.kill(pid, signal.SIGKILL)
        new_pid = wait_for(lambda: (p := running_pid(node, "etcd")) and p != pid and p, timeout_s=15,
                           what="etcd restarted")
        assert container(node, "etcd")["restart_count"] == 1
        assert container(node, "etcd")["last_terminated"]["exitCode"] == 137

        # Changed manifest: old process stopped, new one started (a new pod: counts reset).
        write_manifest(node, "etcd", images["etcd"], ["etcd", "--data-dir=/var/lib/etcd", "--name=n2"])
        newer = wait_for(lambda: (p := running_pid(node, "etcd")) and p != new_pid and p, timeout_s=15,
                         what="etcd restarted after manifest change")
        wait_for(lambda: not pid_alive(new_pid), timeout_s=10, what="old etcd stopped")
        assert b"--name=n2" in Path(f"/proc/{newer}/cmdline").read_bytes()
        assert container(node, "etcd")["restart_count"] == 0

        # Removed manifest: process stopped, record gone.
        (node / "etc/kubernetes/manifests/etcd.yaml").unlink()
        wait_for(lambda: not pid_alive(newer), timeout_s=10, what="etcd stopped after manifest removal")
        wait_for(lambda: "kube-system/etcd" not in records(node), timeout_s=5, what="record cleared")
    finally:
        kill_group(proc)


def test_crashing_process_backs_off(node: Path, images: dict[str, str]) -> None:
    # kube-scheduler without a readable kubeconfig exits 1 at once: a real crash loop.
    write_manifest(node, "kube-scheduler", images["kube-scheduler"],
                   ["kube-scheduler", "--kubeconfig=/etc/kubernetes/scheduler.conf"])
    proc = kubelet(node)
    try:
        wait_for(lambda: container(node, "kube-scheduler")["restart_count"] >= 2, timeout_s=30,
                 what="two restarts")
        c = container(node, "kube-scheduler")
        assert c["last_terminated"]["exitCode"] == 1
        # The back-off lives in the kubelet's memory, as upstream's (pkg/kubelet/kubelet.go klet.backOff): not
        # in what a restarted kubelet reads back, which would show CrashLoopBackOff at its first restart.
        assert "crash_streak" not in c and "backoff_until" not in c
        log = (node / "var/log/pods/kube-system_kube-scheduler/kube-scheduler.log").read_text()
        assert "scheduler.conf" in log
    finally:
        kill_group(proc)


def test_restart_adopts_and_stop_pod_processes(node: Path, images: dict[str, str]) -> None:
    write_manifest(node, "etcd", images["etcd"], ["etcd", "--data-dir=/var/lib/etcd"])
    proc = kubelet(node)
    try:
        pid = wait_for(lambda: running_pid(node, "etcd"), timeout_s=15, what="etcd process")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert pid_alive(pid), "static pod process must survive a kubelet stop"
    finally:
        kill_group(proc)
    proc = kubelet(node)
    try:
        wait_for(lambda: "adopted running kube-system/etcd" in (node.parent / "kubelet.log").read_text(),
                 timeout_s=15, what="adoption")
        assert running_pid(node, "etcd") == pid
        log = (node / "var/log/pods/kube-system_etcd/etcd.log").read_text()
        assert log.count("start etcd") == 1, "adopted process must not be started a second time"
    finally:
        kill_group(proc)
    assert stop_pod_processes(NodeRoot(node), grace_s=5) == 1
    wait_for(lambda: not pid_alive(pid), timeout_s=5, what="etcd stopped")
    assert records(node) == {}
    assert stop_pod_processes(NodeRoot(node)) == 0


def test_exit_after_fault(node: Path) -> None:
    (node / "etc/simnode").mkdir(parents=True)
    (node / "etc/simnode/faults.json").write_text(json.dumps({"kubelet_exit_after_s": 1}))
    proc = kubelet(node)
    try:
        assert proc.wait(timeout=15) == 1
    finally:
        kill_group(proc)
    assert "kubelet_exit_after_s" in (node.parent / "kubelet.log").read_text()


def test_stop_pod_processes_stops_a_pod_process_no_kubelet_recorded(tmp_path: Path) -> None:
    """kubeadm reset removes every container the runtime lists, not only what the kubelet wrote down: a kubelet
    stopped between starting a pod and recording it must not leave that pod running (issue 8, defect 3)."""
    root = NodeRoot(tmp_path)
    env = dict(os.environ, SIMNODE_POD="kube-system/etcd-node/etcd", SIMNODE_ROOT=str(tmp_path))
    other_env = dict(env, SIMNODE_ROOT=str(tmp_path / "other-node"))
    unrecorded = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env,
                                  start_new_session=True)
    of_another_node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=other_env,
                                       start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while b"SIMNODE_POD" not in Path(f"/proc/{unrecorded.pid}/environ").read_bytes():
            assert time.monotonic() < deadline, "the child never exec'd"
            time.sleep(0.02)
        assert stop_pod_processes(root, grace_s=2) == 1
        assert unrecorded.wait(timeout=5) == -signal.SIGTERM
        assert of_another_node.poll() is None
    finally:
        for proc in (unrecorded, of_another_node):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
