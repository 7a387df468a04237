"""lifecycle.hostprocs against real processes: what counts as the node's, and ending it (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifecycle import hostprocs

SLEEP = "import time; time.sleep(600)"
DEAF = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
        "time.sleep(600)")


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_processes_under_finds_by_working_directory_and_argument_and_never_this_process(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    root = tmp_path / "root"
    (root / "var").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    by_cwd = subprocess.Popen([sys.executable, "-c", SLEEP], cwd=root / "var")
    by_arg = subprocess.Popen([sys.executable, "-c", SLEEP, str(root / "usr/bin/kubelet")])
    elsewhere = subprocess.Popen([sys.executable, "-c", SLEEP, f"{root}-other/x"], cwd=tmp_path)
    spawned += [by_cwd, by_arg, elsewhere]

    found = {p.pid for p in hostprocs.processes_under(root)}

    assert found == {by_cwd.pid, by_arg.pid}
    assert [p.pid for p in hostprocs.running_program(root / "usr/bin/kubelet")] == [by_arg.pid]


def test_end_processes_kills_what_ignores_sigterm_and_says_so(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    polite = subprocess.Popen([sys.executable, "-c", SLEEP], cwd=tmp_path)
    deaf = subprocess.Popen([sys.executable, "-c", DEAF], cwd=tmp_path, stdout=subprocess.PIPE)
    spawned += [polite, deaf]
    assert deaf.stdout is not None and deaf.stdout.readline() == b"ready\n"  # its handler is in place

    targets = hostprocs.processes_under(tmp_path)
    killed = asyncio.run(hostprocs.end_processes(targets, grace_s=0.5))

    assert [p.pid for p in killed] == [deaf.pid]
    assert polite.wait(timeout=5) == -15 and deaf.wait(timeout=5) == -9
    assert not any(hostprocs.is_alive(p) for p in targets)
