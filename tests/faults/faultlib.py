"""Helpers of the fault suite: the e2e helpers (a real `lifecycle serve` on the simulated node, driven over MQTT)
and what the fault tests count from outside (/proc, the Docker Engine)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from test_install_over_mqtt import (
    INSTALL_CHAIN,
    Node,
    Subscriber,
    _kill_processes_under,
    _wait_state,
    make_node,
    payload,
)

__all__ = [
    "INSTALL_CHAIN",
    "Node",
    "Subscriber",
    "_kill_processes_under",
    "_wait_state",
    "components_under",
    "engine_leftovers",
    "kubelets_under",
    "make_node",
    "payload",
    "processes_under",
    "state_seqs",
    "wait_until",
]


def _live(entry: Path) -> bool:
    """Not a zombie: a SIGKILLed process keeps its /proc entry until it is reaped."""
    with contextlib.suppress(OSError):
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def kubelets_under(root: Path) -> list[int]:
    """Pids of the kubelets started from the node's own binary (not the static pods the simulated kubelet runs
    from the same zipapp, simnode/launch.py: their parent is a kubelet); as tests/e2e/test_engine_faults_over_mqtt.py.
    """
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _live(entry):
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if str(root / "usr/bin/kubelet").encode() in argv[:2]:  # [0] or, run by its shebang's python, [1]
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return [pid for pid, parent in parents.items() if parent not in parents]


def components_under(root: Path) -> dict[str, list[int]]:
    """Live static pod processes of the node, by container name (simnode/kubelet/runtime.py marks each one with
    SIMNODE_POD=<ns>/<pod>/<container> and runs it with SIMNODE_ROOT=<root>)."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not _live(entry):
            continue
        with contextlib.suppress(OSError):
            env = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
            mark = env.get(b"SIMNODE_POD")
            if mark and env.get(b"SIMNODE_ROOT") == str(root).encode():
                found.setdefault(mark.decode().rsplit("/", 1)[-1], []).append(int(entry.name))
    return found


def processes_under(root: Path) -> list[str]:
    """Live processes whose command line or working directory lies under the node root."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not _live(entry):
            continue
        with contextlib.suppress(OSError):
            cwd = str((entry / "cwd").readlink())
            args = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            if cwd == str(root) or cwd.startswith(f"{root}/") or any(f"{root}/" in a for a in args):
                found.append(f"{entry.name}: {' '.join(args)}")
    return found


def engine_leftovers(node_name: str) -> list[str]:
    """Containers of any state the service left in the Docker Engine for this node."""
    out = subprocess.run(["docker", "ps", "-a", "--filter", f"label=lifecycle.node={node_name}", "-q"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def state_seqs(sub: Subscriber) -> list[int]:
    """The `state_seq` of every state change the subscriber saw, in arrival order, repeats dropped (the outbox may
    re-publish the last change after a restart: the same event again)."""
    seqs = [payload(m)["data"]["state_seq"] for m in sub.messages
            if payload(m).get("type") == "lifecycle.state.changed"]
    return list(dict.fromkeys(seqs))


def wait_until(predicate: Callable[[], Any], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s")
        time.sleep(0.1)
