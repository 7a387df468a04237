"""Processes of the node across a SIGKILL of the service and across a reset (issue 8, defects 1, 3 and 6).

The real `lifecycle serve` on the simulated node, driven over MQTT and killed with SIGKILL; the node's processes
are counted from /proc, as an operator would with `ps`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import test_install_over_mqtt
from test_install_over_mqtt import Node, _wait_state, payload

make_node = test_install_over_mqtt.make_node  # the fixture, shared


def _cmdline(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    return []


def _is_pod(pid: int) -> bool:
    """The simulated node runs its static pods from the kubelet's own zipapp, marked by SIMNODE_POD."""
    with contextlib.suppress(OSError):
        return any(v.startswith(b"SIMNODE_POD=") for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    return False


def _running(program: Path) -> list[int]:
    """Pids of live processes running `program` (not the static pods the simulated kubelet runs from it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and str(program) in _cmdline(int(entry.name)) and not _is_pod(int(entry.name)):
            with contextlib.suppress(OSError):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(entry.name))
    return pids


def _under_root(root: Path) -> list[str]:
    """Live processes whose command line or working directory lies under the node root."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cwd = str((entry / "cwd").readlink())
            args = _cmdline(int(entry.name))
            if cwd == str(root) or cwd.startswith(f"{root}/") or any(f"{root}/" in a for a in args):
                found.append(f"{entry.name}: {' '.join(args)}")
    return found


def _wait_until(predicate: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s")
        time.sleep(0.05)


def test_restart_after_kill_between_kubelet_spawn_and_its_pid_file_keeps_one_kubelet(
    make_node: Callable[..., Node],
) -> None:
    """Defect 1. The window is a few ms wide, so the test builds its outcome: a kubelet runs, the pid file the
    killed service would have written next is not there."""
    node = make_node()
    node.write_faults({"delays_s": {"kubelet_start": 3.0}})  # the kubelet state lasts: room to kill in it
    node.start_service()
    events = node.subscribe("events")
    assert payload(node.request({"id": "i1", "action": "install"}, correlation="c1"))["ok"] is True
    kubelet = node.root / "usr/bin/kubelet"
    _wait_until(lambda: bool(_running(kubelet)), timeout_s=120, what="no kubelet started")
    node.kill_service()
    (node.root / "var/lib/lifecycle/kubelet.pid").unlink(missing_ok=True)
    orphan = _running(kubelet)
    assert len(orphan) == 1, orphan
    node.write_faults(None)

    node.start_service()
    last = _wait_state(events, "running", timeout_s=120)
    assert last["data"]["to"] == "running", node.log_path.read_text()[-3000:]
    assert _running(kubelet) == orphan, "the restarted service must adopt the kubelet, not start another"


def test_reset_ends_every_process_of_the_node_and_names_what_kubeadm_reset_missed(
    make_node: Callable[..., Node],
) -> None:
    """Defect 3. Two leftovers as a crashed kubelet leaves them: a pod process it started but never recorded
    (labelled like the runtime's containers) and a process of no pod that still runs in the node root."""
    node = make_node()
    node.start_service()
    events = node.subscribe("events")
    assert payload(node.request({"id": "i1", "action": "install"}, correlation="c1"))["ok"] is True
    reached = _wait_state(events, "readiness", timeout_s=180)
    assert reached["data"]["to"] == "readiness", node.log_path.read_text()[-3000:]
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    pod_env = dict(os.environ, SIMNODE_POD="kube-system/etcd-unrecorded/etcd", SIMNODE_ROOT=str(node.root))
    strays = [subprocess.Popen(sleeper, cwd=node.root, env=pod_env, start_new_session=True),
              subprocess.Popen(sleeper, cwd=node.root / "var", start_new_session=True)]
    try:
        assert payload(node.request({"id": "wipe", "action": "reset"}, correlation="r1"))["ok"] is True
        idle = _wait_state(events, "idle", timeout_s=120, request_id="wipe")
        assert idle["data"]["to"] == "idle", node.log_path.read_text()[-3000:]
        for stray in strays:
            stray.wait(timeout=5)  # ended by the reset, before it reported idle
        assert not _under_root(node.root), _under_root(node.root)
        named = [payload(m)["data"].get("message", "") for m in events.messages
                 if payload(m)["type"] == "lifecycle.step.progress"]
        assert any(f"pid {strays[1].pid} " in message for message in named), named
    finally:
        for stray in strays:
            if stray.poll() is None:
                stray.kill()
                stray.wait()


def test_restart_after_kill_during_a_slow_kubeadm_phase_never_runs_two_kubeadms(
    make_node: Callable[..., Node],
) -> None:
    """Defect 6. The killed service's `kubeadm init phase` runs on in its own session; the restarted service
    must end it before it runs kubeadm again."""
    node = make_node()
    node.write_faults({"delays_s": {"kubeadm_phase": 15.0}})  # the orphan outlives the restart
    node.start_service()
    events = node.subscribe("events")
    assert payload(node.request({"id": "i1", "action": "install"}, correlation="c1"))["ok"] is True
    kubeadm = node.root / "usr/bin/kubeadm"
    _wait_until(lambda: bool(_running(kubeadm)), timeout_s=120, what="no kubeadm started")
    time.sleep(2.0)  # it has read the faults file (python starts in well under that) and sleeps in its delay
    node.kill_service()
    orphans = set(_running(kubeadm))
    assert orphans, "the kubeadm phase ended with the service: nothing to test"
    node.write_faults(None)

    most = 0
    orphan_with_new: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        nonlocal most
        while not done.is_set():
            now = set(_running(kubeadm))
            most = max(most, len(now))
            if now - orphans:
                orphan_with_new.update(now & orphans)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        node.start_service()
        last = _wait_state(events, "kubelet", timeout_s=120)
        assert last["data"]["to"] == "kubelet", node.log_path.read_text()[-3000:]
    finally:
        done.set()
        watcher.join(timeout=5)
    assert not orphan_with_new, f"the orphan {orphan_with_new} ran beside the restarted service's kubeadm"
    assert most <= 1, f"{most} kubeadm processes at once"
    assert not (orphans & set(_running(kubeadm)))
