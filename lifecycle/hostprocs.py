"""The host's process table (/proc, never re-rooted): which processes belong to the node, and ending them.

A process belongs to the node when its executable, its working directory or an argument of its command line
lies under the node root; on a real VM (root "/") only the node's own programs (`<root>/usr/bin/<name>`) count.
Nothing is written; a pid is identified with its kernel start time so a reused pid is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_POLL_S = 0.05
NODE_PROGRAMS = ("kubelet", "kubeadm", "kubectl", "crictl")  # what the binaries state installs


@dataclass(frozen=True)
class HostProcess:
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22
    cmdline: tuple[str, ...]

    def describe(self) -> str:
        return f"pid {self.pid} ({' '.join(self.cmdline)[:200]})"


def start_ticks(pid: int) -> int | None:
    """The kernel start time of `pid`, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name in parens may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def started_at_s(ticks: int) -> float:
    """The wall-clock time (epoch s) of a process start given as /proc/<pid>/stat's start time: the kernel counts
    it in clock ticks since boot, as /proc/uptime counts seconds since boot (10 ms steps both)."""
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime_s + ticks / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part) or None


def _link(pid: int, name: str) -> str | None:
    try:
        return str(Path(f"/proc/{pid}/{name}").readlink())
    except OSError:
        return None  # gone, or a process of another user


def _own_lineage() -> set[int]:
    """This process and its ancestors: never "of the node", whatever their working directory."""
    pids: set[int] = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rfind(")") + 2 :].split()[1])
    return pids


def _snapshot(pid: int) -> HostProcess | None:
    ticks, args = start_ticks(pid), cmdline(pid)
    if ticks is None or args is None:
        return None  # kernel threads have no command line
    return HostProcess(pid=pid, start_ticks=ticks, cmdline=args)


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _scan(matches: Callable[[int, HostProcess], bool]) -> list[HostProcess]:
    """One pass over /proc: the live processes `matches` accepts, this service and its ancestors excepted."""
    mine = _own_lineage()
    found: list[HostProcess] = []
    for pid in _all_pids():
        if pid in mine:
            continue
        proc = _snapshot(pid)
        if proc is not None and matches(pid, proc):
            found.append(proc)
    return found


def running_program(program: Path) -> list[HostProcess]:
    """Live processes running `program`: as their executable or as an argument (a script's interpreter)."""
    return _running_any([str(program)])


def _running_any(wanted: list[str]) -> list[HostProcess]:
    return _scan(lambda pid, proc: any(w in proc.cmdline for w in wanted) or _link(pid, "exe") in wanted)


def processes_under(root: Path) -> list[HostProcess]:
    """Live processes of the node under `root` (see the module head), this service and its ancestors excepted."""
    resolved = root.resolve()
    if resolved == Path("/"):
        return sorted(_running_any([str(resolved / "usr/bin" / name) for name in NODE_PROGRAMS]), key=lambda p: p.pid)
    prefix = f"{resolved}/"

    def under(path: str | None) -> bool:
        return path is not None and (path == str(resolved) or path.startswith(prefix))

    return _scan(lambda pid, proc: under(_link(pid, "exe")) or under(_link(pid, "cwd"))
                 or any(under(arg) for arg in proc.cmdline))


def is_alive(proc: HostProcess) -> bool:
    return start_ticks(proc.pid) == proc.start_ticks


def _signal(proc: HostProcess, sig: signal.Signals) -> None:
    if is_alive(proc):  # checked right before: a pid the kernel gave to someone else is never hit
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


async def end_processes(procs: Sequence[HostProcess], *, grace_s: float = 5.0) -> list[HostProcess]:
    """SIGTERM each, SIGKILL what still lives after `grace_s`; returns those that had to be killed."""
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    await _wait_gone(procs, timeout_s=grace_s)
    stubborn = [p for p in procs if is_alive(p)]
    for proc in stubborn:
        _signal(proc, signal.SIGKILL)
    await _wait_gone(stubborn, timeout_s=grace_s)
    return stubborn


async def _wait_gone(procs: Sequence[HostProcess], *, timeout_s: float) -> None:
    # Polled: processes that are not our children give no event we could wait on (a pidfd each would do,
    # at the cost of an fd per process).
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + timeout_s
    for proc in procs:
        while is_alive(proc) and loop.time() < give_up_at:  # noqa: ASYNC110
            await asyncio.sleep(_POLL_S)


def describe_all(procs: Iterable[HostProcess]) -> str:
    return ", ".join(p.describe() for p in procs)
