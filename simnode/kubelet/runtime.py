"""Static pod containers as detached processes: start, recognise (adopt), stop, and the pid record.

Leaves `<root>/var/lib/kubelet/simnode/pods.json` (written atomically) and container logs under
`<root>/var/log/pods/<ns>_<name>/<container>.log`. Processes run in their own session, so they
outlive the kubelet like containers outlive a real one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from simnode.launch import IMAGE_VERSION_ENV, image_version, tool_command
from simnode.paths import ROOT_ENV, NodeRoot

log = logging.getLogger("kubelet.runtime")

RECORD_REAL_PATH = "/var/lib/kubelet/simnode/pods.json"
POD_ENV = "SIMNODE_POD"  # "<ns>/<name>/<container>": how a process is recognised as one of ours
TOOLS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd")
API_STATE_REAL_PATH = "/var/lib/kubelet/simnode/state.json"  # apisync.py keeps API pod pids here


def record_path(root: NodeRoot) -> Path:
    return root.path(RECORD_REAL_PATH)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=1, sort_keys=True)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_records(root: NodeRoot) -> dict[str, Any]:
    """pod key "<ns>/<name>" -> {"uid", "manifest_hash", "containers": {name: {"pid", ...}}}."""
    path = record_path(root)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable pod record %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def save_records(root: NodeRoot, records: dict[str, Any]) -> None:
    write_json_atomic(record_path(root), records)


def marker(namespace: str, name: str, container: str) -> str:
    return f"{namespace}/{name}/{container}"


def pid_running(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def is_ours(pid: int, root: NodeRoot, mark: str) -> bool:
    """The pid is alive and is the pod process `mark` of this node root (not a recycled pid)."""
    if not pid_running(pid):
        return False
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{POD_ENV}={mark}".encode() in environ and f"{ROOT_ENV}={root.root}".encode() in environ


def labelled_processes(root: NodeRoot) -> list[int]:
    """Live pod processes of this node root, recorded or not (the runtime's "containers" by label)."""
    label = f"{ROOT_ENV}={root.root}".encode()
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or another user's
        pod = any(var.startswith(f"{POD_ENV}=".encode()) for var in environ)
        if label in environ and pod and pid_running(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def log_path(root: NodeRoot, namespace: str, name: str, container: str) -> Path:
    return root.path(f"/var/log/pods/{namespace}_{name}/{container}.log")


def spawn(root: NodeRoot, namespace: str, name: str, container: str, command: list[str], *,
          image: str = "") -> subprocess.Popen[bytes]:
    """Start `command[0]` (one of TOOLS) from the same build, detached, output to the container log; the version
    its image's tag names goes along (simnode.launch.component_version)."""
    argv, env = tool_command(command[0], command[1:], root=root)
    version = image_version(image)
    if version is not None:
        env[IMAGE_VERSION_ENV] = version
    env[POD_ENV] = marker(namespace, name, container)
    logfile = log_path(root, namespace, name, container)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} start {command[0]}\n".encode())
        out.flush()
        return subprocess.Popen(
            argv,
            env=env,
            cwd=str(root.root),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: survives us, and is stopped as a group
        )


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group the pod process leads (it was started in a new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def stop_process(pid: int, *, grace_s: float, child: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM, then SIGKILL after grace_s. Blocking; reaps `child` when it is ours."""
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            return
        if child is None and not pid_running(pid):
            return
        time.sleep(0.05)
    log.warning("pod process %d ignored SIGTERM for %.1fs; killing it", pid, grace_s)
    signal_group(pid, signal.SIGKILL)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)


def stop_pod_processes(root: NodeRoot, *, grace_s: float = 5.0) -> int:
    """Stop every pod process recorded under `root` and clear the record; returns how many were stopped.

    Used by `kubeadm reset` (real kubeadm removes the containers through the CRI). Only processes that
    still carry this root's pod marker are signalled, so a recycled pid is never hit.
    """
    records = load_records(root)
    victims: list[int] = []
    for key, pod in records.items():
        namespace, _, name = key.partition("/")
        for cname, cont in (pod.get("containers") or {}).items():
            pid = cont.get("pid")
            if isinstance(pid, int) and is_ours(pid, root, marker(namespace, name, cname)):
                signal_group(pid, signal.SIGTERM)
                victims.append(pid)
    # kubeadm: cmd/kubeadm/app/cmd/phases/reset/cleanupnode.go removeContainers -> util/runtime/runtime.go
    # ListKubeContainers: reset removes every pod container the runtime lists, not what the kubelet recorded.
    # Our runtime's list is the process table: every process labelled with this root's pod marker.
    for pid in labelled_processes(root):
        if pid not in victims:
            log.info("stopping unrecorded pod process %d", pid)
            signal_group(pid, signal.SIGTERM)
            victims.append(pid)
    _kill_after(victims, grace_s=grace_s)
    if record_path(root).exists():
        save_records(root, {})
    return len(victims)


def stop_workload_processes(root: NodeRoot, *, grace_s: float = 5.0) -> int:
    """Stop the API pods' processes (simnode/kubelet/workloads.py) recorded under `root` (kubeadm reset removes
    every container). Here, not next to the code that starts them, so that kubeadm reset does not import aiohttp."""
    try:
        state = json.loads(root.path(API_STATE_REAL_PATH).read_text())
    except (OSError, ValueError):
        return 0
    victims: list[int] = []
    for pod in ((state.get("api_pods") or {}) if isinstance(state, dict) else {}).values():
        for cname, cont in (pod.get("containers") or {}).items():
            pid = cont.get("pid")
            mark = marker(str(pod.get("namespace")), str(pod.get("name")), str(cname))
            if isinstance(pid, int) and is_ours(pid, root, mark):
                signal_group(pid, signal.SIGTERM)
                victims.append(pid)
    _kill_after(victims, grace_s=grace_s)
    return len(victims)


def _kill_after(victims: list[int], *, grace_s: float) -> None:
    """Give the SIGTERMed `victims` grace_s to go, then SIGKILL the groups of those still running."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_running(p) for p in victims):
        time.sleep(0.05)
    for pid in victims:
        if pid_running(pid):
            signal_group(pid, signal.SIGKILL)
