"""The kubelet's log rotated by size (issue 11, part 6): a kubelet writing fast through ProcessKubeletSupervisor
leaves at most `files` files of at most `max_bytes`, the newest lines in the current file with no line lost in the
kept window, and the service (this process) holds no fd of the log and no more fds after kubelet restarts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
from lifecycle_fakes import eventually

from lifecycle.adapters.kubelet import ProcessKubeletSupervisor

LOG = structlog.get_logger("test")
MAX_BYTES, FILES, LINES = 50_000, 3, 20_000  # ~1.5 MB of output: about 30 rotations

# Numbered lines as fast as Python prints them, then idle (as a kubelet after its start-up burst).
FAST_KUBELET = f"""\
import sys, time
for n in range({LINES}):
    sys.stdout.write(f"line {{n:06d}} " + "x" * 60 + "\\n")
sys.stdout.flush()
print("done", flush=True)
while True:
    time.sleep(1)
"""


def _log_text(path: Path) -> str:
    """The current file, or "" in the instant between a rotation's rename and the new file (as any reader sees)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _own_fds() -> list[str]:
    targets = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            targets.append(str(fd.readlink()))
        except FileNotFoundError:  # the fd listdir itself used, closed since
            continue
    return targets


async def _start(supervisor: ProcessKubeletSupervisor, tmp_path: Path, script: str) -> Path:
    """Start a kubelet that is the Python `script`; returns its log's path."""
    kubelet = tmp_path / "usr/bin/kubelet"
    kubelet.parent.mkdir(parents=True)
    kubelet.write_text(f"#!{sys.executable}\n{script}")
    kubelet.chmod(0o755)
    log_path = tmp_path / "log" / "kubelet.log"
    await supervisor.start([str(kubelet)], log_path=log_path)
    return log_path


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[ProcessKubeletSupervisor]:
    sup = ProcessKubeletSupervisor(pid_file=tmp_path / "kubelet.pid", log=LOG, min_backoff_s=0.05,
                                   log_rotation=(MAX_BYTES, FILES))
    yield sup
    await sup.stop(timeout_s=2)


async def test_a_fast_kubelet_leaves_at_most_n_files_of_at_most_the_size_newest_lines_current(
    supervisor: ProcessKubeletSupervisor, tmp_path: Path,
) -> None:
    log_path = await _start(supervisor, tmp_path, FAST_KUBELET)
    await eventually(lambda: _log_text(log_path).endswith("done\n"), timeout_s=10)

    kept = sorted(log_path.parent.iterdir())
    assert [p.name for p in kept] == ["kubelet.log", "kubelet.log.1", "kubelet.log.2"]
    assert all(p.stat().st_size <= MAX_BYTES for p in kept), [p.stat().st_size for p in kept]
    text = "".join((log_path.parent / name).read_text() for name in ("kubelet.log.2", "kubelet.log.1", "kubelet.log"))
    lines = text.splitlines()
    assert lines[-1] == "done" and lines[-2].startswith(f"line {LINES - 1:06d} ")
    numbers = [int(line.split()[1]) for line in lines[:-1]]
    assert numbers == list(range(numbers[0], LINES)), "a line is missing or split in the kept window"
    assert all(len(line) == 72 for line in lines[:-1]), "every line whole"
    assert not any(str(log_path) in target for target in _own_fds()), "the service holds no fd of the log"


async def test_kubelet_restarts_leave_the_services_fds_as_they_were(
    supervisor: ProcessKubeletSupervisor, tmp_path: Path,
) -> None:
    log_path = await _start(supervisor, tmp_path, "import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    await eventually(lambda: _log_text(log_path).count("up") == 1, timeout_s=10)
    before = len(_own_fds())
    for restart in range(1, 4):
        pid = int(json.loads((tmp_path / "kubelet.pid").read_text())["pid"])
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda r=restart: supervisor.restarts == r and _log_text(log_path).count("up") == r + 1,
                         timeout_s=10)
    await asyncio.sleep(0.2)  # the finished log writers are reaped
    assert len(_own_fds()) <= before, (before, _own_fds())
