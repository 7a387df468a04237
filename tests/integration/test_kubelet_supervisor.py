"""ProcessKubeletSupervisor with a real long-running stand-in kubelet: restart with backoff, adoption by a new
supervisor after the service process dies, stop (SIGTERM, then SIGKILL), pid reuse not mistaken for ours."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from lifecycle.adapters.kubelet import ProcessKubeletSupervisor

REPO = Path(__file__).resolve().parents[2]
LOG = structlog.get_logger("test")

FAKE_KUBELET = """\
import signal, sys, time
if "--ignore-sigterm" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("fake kubelet up", sys.argv[1:], flush=True)
while True:
    time.sleep(1)
"""


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[Path]:
    """An executable at <tmp>/usr/bin/kubelet (a script, like the zipapp stand-in); kills leftovers after."""
    path = tmp_path / "usr" / "bin" / "kubelet"
    path.parent.mkdir(parents=True)
    path.write_text(f"#!{sys.executable}\n{FAKE_KUBELET}")
    path.chmod(0o755)
    yield path
    for pid in _pids_running(path):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[ProcessKubeletSupervisor]:
    sup = ProcessKubeletSupervisor(pid_file=tmp_path / "kubelet.pid", log=LOG)
    yield sup
    await sup.stop(timeout_s=2)


async def test_start_writes_the_pid_file_and_logs(
    supervisor: ProcessKubeletSupervisor, kubelet: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "log" / "kubelet.log"
    await supervisor.start([str(kubelet), "--v=2"], log_path=log_path)
    assert supervisor.is_running()
    record = json.loads((tmp_path / "kubelet.pid").read_text())
    assert record["argv"] == [str(kubelet), "--v=2"]
    assert _pids_running(kubelet) == [record["pid"]]
    await _until(lambda: "fake kubelet up" in log_path.read_text(), timeout_s=5)
    # Its own session: a signal to the service's process group does not reach it.
    assert os.getsid(record["pid"]) == record["pid"]


async def test_a_killed_kubelet_is_restarted_with_growing_backoff(
    supervisor: ProcessKubeletSupervisor, kubelet: Path, tmp_path: Path
) -> None:
    await supervisor.start([str(kubelet)], log_path=tmp_path / "kubelet.log")
    first = _pids_running(kubelet)[0]

    killed_at = time.monotonic()
    os.kill(first, signal.SIGKILL)
    await _until(lambda: supervisor.restarts == 1 and supervisor.is_running(), timeout_s=5)
    first_delay_s = time.monotonic() - killed_at
    second = _pids_running(kubelet)
    assert len(second) == 1 and second[0] != first

    killed_at = time.monotonic()
    os.kill(second[0], signal.SIGKILL)
    await _until(lambda: supervisor.restarts == 2 and supervisor.is_running(), timeout_s=6)
    second_delay_s = time.monotonic() - killed_at

    assert 0.9 <= first_delay_s < 1.8
    assert 1.9 <= second_delay_s < 3.0
    assert json.loads((tmp_path / "kubelet.pid").read_text())["pid"] == _pids_running(kubelet)[0]


async def test_a_new_supervisor_adopts_the_kubelet_of_a_crashed_service(kubelet: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "kubelet.pid"
    argv = [str(kubelet), "--config=/var/lib/kubelet/config.yaml"]
    _start_in_a_service_that_then_crashes(pid_file=pid_file, argv=argv, log_path=tmp_path / "kubelet.log")
    [pid] = _pids_running(kubelet)

    adopted = ProcessKubeletSupervisor(pid_file=pid_file, log=LOG)
    try:
        assert adopted.is_running()
        await adopted.start(argv, log_path=tmp_path / "kubelet.log")
        assert _pids_running(kubelet) == [pid], "a second kubelet was started"

        # The adopted process is not our child, yet its death is noticed and it is restarted.
        os.kill(pid, signal.SIGKILL)
        await _until(lambda: adopted.restarts == 1 and adopted.is_running(), timeout_s=5)
        assert len(_pids_running(kubelet)) == 1
    finally:
        await adopted.stop(timeout_s=2)
    assert _pids_running(kubelet) == []
    assert not pid_file.exists()


async def test_stop_uses_sigkill_when_sigterm_is_ignored(
    supervisor: ProcessKubeletSupervisor, kubelet: Path, tmp_path: Path
) -> None:
    await supervisor.start([str(kubelet), "--ignore-sigterm"], log_path=tmp_path / "kubelet.log")
    await asyncio.sleep(0.3)  # let it install its handler
    started = time.monotonic()
    await supervisor.stop(timeout_s=0.5)
    assert 0.4 <= time.monotonic() - started < 2
    assert _pids_running(kubelet) == []
    assert not supervisor.is_running()
    assert not (tmp_path / "kubelet.pid").exists()
    await asyncio.sleep(1.5)  # longer than the first backoff: a stopped kubelet stays stopped
    assert _pids_running(kubelet) == []


async def test_a_changed_command_line_replaces_the_kubelet(
    supervisor: ProcessKubeletSupervisor, kubelet: Path, tmp_path: Path
) -> None:
    await supervisor.start([str(kubelet), "--v=1"], log_path=tmp_path / "kubelet.log")
    [old] = _pids_running(kubelet)
    await supervisor.start([str(kubelet), "--v=2"], log_path=tmp_path / "kubelet.log")
    [new] = _pids_running(kubelet)
    assert new != old
    assert _cmdline(new)[-1] == "--v=2"


async def test_a_reused_pid_is_not_adopted(kubelet: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "kubelet.pid"
    # Our own pid, with a start time that is not ours: what a pid file looks like after the kubelet died
    # and the kernel handed its pid to another process.
    pid_file.write_text(json.dumps({
        "pid": os.getpid(), "start_ticks": 1, "argv": [str(kubelet)], "cmdline": _cmdline(os.getpid()),
        "log_path": str(tmp_path / "kubelet.log"),
    }))
    sup = ProcessKubeletSupervisor(pid_file=pid_file, log=LOG)
    try:
        assert not sup.is_running()
        await sup.start([str(kubelet)], log_path=tmp_path / "kubelet.log")
        assert len(_pids_running(kubelet)) == 1
        assert json.loads(pid_file.read_text())["pid"] != os.getpid()
    finally:
        await sup.stop(timeout_s=2)


# ---- helpers ---------------------------------------------------------------------------------------------


def _start_in_a_service_that_then_crashes(*, pid_file: Path, argv: list[str], log_path: Path) -> None:
    """A separate Python process plays the service: it starts the kubelet and is then SIGKILLed."""
    code = (
        "import asyncio, sys, structlog\n"
        "from pathlib import Path\n"
        "from lifecycle.adapters.kubelet import ProcessKubeletSupervisor\n"
        "async def main():\n"
        f"    sup = ProcessKubeletSupervisor(pid_file=Path({str(pid_file)!r}), log=structlog.get_logger())\n"
        f"    await sup.start({argv!r}, log_path=Path({str(log_path)!r}))\n"
        "    print('started', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    service = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        assert service.stdout is not None
        output = []
        for line in service.stdout:  # structlog's default logger writes to stdout too
            output.append(line)
            if line.strip() == b"started":
                break
        else:
            raise AssertionError(b"".join(output).decode())
    finally:
        service.kill()
        service.wait()


def _cmdline(pid: int) -> list[str]:
    return [p.decode() for p in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if p]


def _pids_running(program: Path) -> list[int]:
    """Live (not zombie) processes whose command line runs `program`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = _cmdline(int(entry.name))
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z" and str(program) in cmdline[:2]:
            found.append(int(entry.name))
    return sorted(found)


async def _until(condition: object, *, timeout_s: float) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.05)


async def test_a_command_line_read_inside_the_exec_window_still_keeps_one_kubelet(
    kubelet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Right after create_subprocess_exec returns, the kernel may not have laid out the new argv yet
    (/proc/<pid>/cmdline reads empty: seen under load, once per few installs). The supervisor must record the
    real command line, not take the live kubelet for gone and start a second one."""
    from lifecycle.adapters import kubelet as adapter

    real = adapter._cmdline
    empty_reads = {"left": 3}

    def racy(pid: int) -> list[str] | None:
        if empty_reads["left"] > 0 and pid != os.getpid():
            empty_reads["left"] -= 1
            return None  # as in the exec window
        return real(pid)

    monkeypatch.setattr(adapter, "_cmdline", racy)
    sup = ProcessKubeletSupervisor(pid_file=tmp_path / "kubelet.pid", log=LOG, min_backoff_s=0.05)
    try:
        await sup.start([str(kubelet)], log_path=tmp_path / "log" / "kubelet.log")
        record = json.loads((tmp_path / "kubelet.pid").read_text())
        assert record["cmdline"] == real(record["pid"])
        await asyncio.sleep(1.0)  # the supervisor's check runs at once; a restart would follow its 0.05 s backoff
        assert sup.restarts == 0 and _pids_running(kubelet) == [record["pid"]]
    finally:
        await sup.stop(timeout_s=2)


async def test_a_kubelet_started_before_the_loop_is_kept_by_start_and_restarted_when_it_dies(
    kubelet: Path, tmp_path: Path
) -> None:
    """The boot's first step (`start_now`, lifecycle.__main__) then the kubelet step (`start`): one kubelet, whose
    output goes through the rotating log pipe, watched like any other."""
    sup = ProcessKubeletSupervisor(pid_file=tmp_path / "kubelet.pid", log=LOG, min_backoff_s=0.05,
                                   log_rotation=(1_000_000, 2))
    log_path = tmp_path / "log" / "kubelet.log"
    try:
        assert sup.start_now([str(kubelet)], log_path=log_path, env=os.environ) is True
        first = _pids_running(kubelet)
        assert len(first) == 1 and json.loads((tmp_path / "kubelet.pid").read_text())["pid"] == first[0]
        assert sup.start_now([str(kubelet)], log_path=log_path, env=os.environ) is False  # it runs: not twice
        await sup.start([str(kubelet)], log_path=log_path)
        assert _pids_running(kubelet) == first
        await _until(lambda: log_path.exists() and "fake kubelet up" in log_path.read_text(), timeout_s=5)
        os.kill(first[0], signal.SIGKILL)
        await _until(lambda: sup.restarts == 1 and sup.is_running(), timeout_s=5)
        again = _pids_running(kubelet)
        assert len(again) == 1 and again != first
    finally:
        await sup.stop(timeout_s=2)


def _replace_binary(kubelet: Path) -> None:
    """What the binaries and upgrade steps do: a new file next to it, renamed over it (a new inode)."""
    staged = kubelet.with_name("kubelet.new")
    staged.write_text(kubelet.read_text() + "# v2\n")
    staged.chmod(0o755)
    staged.replace(kubelet)


async def test_a_kubelet_whose_binary_was_replaced_is_restarted_by_start_and_kept_otherwise(
    kubelet: Path, tmp_path: Path
) -> None:
    """Issue 10's leftover: after an upgrade whose repair failed, an install found the old kubelet healthy and
    kept it, the new binary on disk. A kubelet started before its binary was put in place is not kept; one
    started after is, also by a new supervisor that adopts it after a service restart."""
    argv = [str(kubelet), "--v=2"]
    pid_file = tmp_path / "kubelet.pid"
    _start_in_a_service_that_then_crashes(pid_file=pid_file, argv=argv, log_path=tmp_path / "kubelet.log")
    [old] = _pids_running(kubelet)
    await asyncio.sleep(0.6)  # past the start-time slack
    sup = ProcessKubeletSupervisor(pid_file=pid_file, log=LOG)  # the restarted service's: adopts it
    try:
        assert sup.is_running() and not sup.binary_replaced()
        await sup.start(argv, log_path=tmp_path / "kubelet.log")
        assert _pids_running(kubelet) == [old], "an unchanged binary keeps its kubelet"

        _replace_binary(kubelet)
        assert sup.is_running() and sup.binary_replaced()
        await sup.start(argv, log_path=tmp_path / "kubelet.log")
        [new] = _pids_running(kubelet)
        assert new != old
        assert sup.is_running() and not sup.binary_replaced()
        await asyncio.sleep(0.6)
        await sup.start(argv, log_path=tmp_path / "kubelet.log")
        assert _pids_running(kubelet) == [new]
        assert sup.restarts == 0, "a replacement, not a crash"
    finally:
        await sup.stop(timeout_s=2)
    assert _pids_running(kubelet) == []
