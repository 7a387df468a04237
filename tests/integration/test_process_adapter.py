"""SubprocessRunner against real child processes: streaming, merged output, tail, env, cancellation."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from lifecycle.adapters.process import SubprocessRunner

PY = sys.executable


async def test_lines_arrive_while_the_command_still_runs() -> None:
    loop = asyncio.get_running_loop()
    seen: list[tuple[float, str]] = []
    script = "import time; print('one', flush=True); time.sleep(0.5); print('two', flush=True)"
    result = await SubprocessRunner().run([PY, "-c", script], on_line=lambda line: seen.append((loop.time(), line)))
    finished_at = loop.time()
    assert [line for _, line in seen] == ["one", "two"]
    assert finished_at - seen[0][0] >= 0.4, "the first line was only delivered at the end"
    assert result.exit_code == 0
    assert result.output_tail == ("one", "two")


async def test_stdout_and_stderr_are_merged_and_the_tail_keeps_the_last_lines() -> None:
    script = (
        "import sys\n"
        "for i in range(100):\n"
        "    stream = sys.stdout if i % 2 == 0 else sys.stderr\n"
        "    print(f'line {i}', file=stream, flush=True)\n"
        "sys.exit(3)\n"
    )
    lines: list[str] = []
    result = await SubprocessRunner().run([PY, "-c", script], on_line=lines.append, tail_lines=5)
    assert lines == [f"line {i}" for i in range(100)]
    assert result.exit_code == 3
    assert result.output_tail == tuple(f"line {i}" for i in range(95, 100))
    assert result.argv == (PY, "-c", script)


async def test_env_is_passed_and_odd_output_is_survived() -> None:
    script = (
        "import os, sys\n"
        "sys.stdout.buffer.write(b'caf\\xe9\\n')\n"
        "sys.stdout.buffer.write(b'x' * 100000)\n"  # one long line without newline at the end
        "print(); print(os.environ['LIFECYCLE_TEST_VALUE'])\n"
    )
    lines: list[str] = []
    result = await SubprocessRunner().run(
        [PY, "-c", script], on_line=lines.append, env={"LIFECYCLE_TEST_VALUE": "hello", "PATH": os.environ["PATH"]}
    )
    assert result.exit_code == 0
    assert lines[0] == "caf\ufffd"
    assert "".join(lines[1:-1]) == "x" * 100000
    assert lines[-1] == "hello"


async def test_a_missing_program_raises_file_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        await SubprocessRunner().run(["/nonexistent/program"])


async def test_cancellation_kills_the_command_and_its_children(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pids_file)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    ready = asyncio.Event()
    task = asyncio.create_task(
        SubprocessRunner().run([PY, "-c", script], on_line=lambda line: ready.set()), name="runner-under-test"
    )
    await asyncio.wait_for(ready.wait(), timeout=10)
    parent_pid, child_pid = (int(p) for p in pids_file.read_text().split())
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 3
    assert not _alive(parent_pid)
    # The grandchild is not ours to reap: init does it shortly after the kill.
    assert await asyncio.to_thread(_gone_within, child_pid, 3.0), "the command's child survived the cancellation"


def _gone_within(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
