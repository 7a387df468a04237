"""Keeps one kubelet process running, as a systemd unit would, and restarts it with backoff when it dies.

Leaves `pid_file` (JSON: pid, kernel start time, argv, cmdline, log path) while the kubelet should run; a new
supervisor (after a service restart) adopts the live process it names instead of starting a second kubelet; a
kubelet with no pid file (the service was killed between spawn and record) is found in /proc by its command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle import hostprocs, logpipe


@dataclass(frozen=True)
class _Record:
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells a reused pid from ours
    argv: list[str]  # as requested by the caller
    cmdline: list[str]  # as the kernel shows it (a script's interpreter comes first)
    log_path: str


class ProcessKubeletSupervisor:
    """`KubeletSupervisor` for a local process started in its own session (it survives a service crash)."""

    def __init__(
        self,
        *,
        pid_file: Path,
        log: Any,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        stable_after_s: float = 60.0,
        log_rotation: tuple[int, int] | None = None,
    ) -> None:
        self._pid_file = pid_file
        self._log_rotation = log_rotation  # (max bytes per file, files): through lifecycle/logpipe.py
        self._log = log
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._stable_after_s = stable_after_s  # a kubelet that ran this long restarts without delay build-up
        self._record: _Record | None = None
        self._proc: asyncio.subprocess.Process | None = None  # set when the kubelet is our own child
        self._task: asyncio.Task[None] | None = None
        self._restarts = 0
        self._adopt()

    # ---- KubeletSupervisor -------------------------------------------------------------------------------

    @property
    def restarts(self) -> int:
        return self._restarts

    def is_running(self) -> bool:
        """True while the supervised kubelet process is alive (not during a restart backoff).

        An adopted kubelet is watched from the first call made inside the event loop, so a service that only
        checks (`is_done`) after a restart still restarts its kubelet should it die later.
        """
        record = self._record
        if record is None or not _alive(record):
            return False
        self._ensure_task()
        return True

    def binary_replaced(self) -> bool:
        record = self._record
        if record is None or not _alive(record):
            return False
        return _replaced_since(Path(record.argv[0]), started_at_s=hostprocs.started_at_s(record.start_ticks))

    async def start(self, argv: Sequence[str], *, log_path: Path) -> None:
        wanted = list(argv)
        if not wanted:
            raise ValueError("kubelet argv is empty")
        if self._record is not None and self._record.argv == wanted and self.binary_replaced():
            self._log.info("kubelet binary replaced since the kubelet started: restarting it", pid=self._record.pid,
                           binary=wanted[0])
            await self.stop()
        if self._record is not None and self._record.argv == wanted:
            if self._task is not None and not self._task.done():
                return  # running or in backoff: the watch task owns it
            if _alive(self._record):
                self._ensure_task()
                return
        if self._record is not None:
            self._log.info("kubelet command line changed: replacing the running kubelet", pid=self._record.pid)
            await self.stop()
        if not await self._adopt_unrecorded(wanted, log_path=log_path):
            await self._spawn(wanted, log_path=log_path)
        self._ensure_task()

    def start_now(self, argv: Sequence[str], *, log_path: Path, env: Mapping[str, str]) -> bool:
        """`start` for the boot, before the event loop exists (lifecycle.__main__): spawns the kubelet unless one
        runs already (adopted from the pid file, or found by its command line), and records it. It is watched from
        the first call made inside the loop, as an adopted kubelet is. True when it spawned one."""
        wanted = list(argv)
        if not wanted:
            raise ValueError("kubelet argv is empty")
        if self._record is not None and _alive(self._record):
            return False
        for proc in hostprocs.running_program(Path(wanted[0])):  # as `_adopt_unrecorded`, without the loop
            if list(proc.cmdline[-len(wanted):]) == wanted:
                record = _Record(pid=proc.pid, start_ticks=proc.start_ticks, argv=wanted, cmdline=list(proc.cmdline),
                                 log_path=str(log_path))
                _write_record(self._pid_file, record)
                self._record, self._proc = record, None
                self._log.info("adopted running kubelet that had no pid file", pid=proc.pid)
                return False
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = self._log_writer_now(log_path, env=env)
        try:
            child = subprocess.Popen(wanted, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=dict(env))
        finally:
            os.close(log_fd)
        _reap_in_thread(child)
        record = _Record(pid=child.pid, start_ticks=_start_ticks(child.pid) or 0, argv=wanted,
                         cmdline=_settled_cmdline_now(child.pid) or wanted, log_path=str(log_path))
        _write_record(self._pid_file, record)
        self._record, self._proc = record, None  # no asyncio child: watched through /proc, reaped by its thread
        self._log.info("started kubelet", pid=child.pid, log_path=str(log_path), before_the_event_loop=True)
        return True

    async def stop(self, *, timeout_s: float = 10.0) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # waits without re-raising the task's CancelledError into us
        record, proc = self._record, self._proc
        self._record, self._proc = None, None
        if record is not None and _alive(record):
            self._log.info("stopping kubelet", pid=record.pid)
            _signal_group(record.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(_wait_exit(record.pid, proc=proc), timeout=timeout_s)
            except TimeoutError:
                self._log.warning("kubelet ignored SIGTERM: killing it", pid=record.pid, timeout_s=timeout_s)
                _signal_group(record.pid, signal.SIGKILL)
                await asyncio.wait_for(_wait_exit(record.pid, proc=proc), timeout=timeout_s)
        self._pid_file.unlink(missing_ok=True)

    # ---- internals ---------------------------------------------------------------------------------------

    def _adopt(self) -> None:
        record = _read_record(self._pid_file)
        if record is None:
            return
        if _alive(record):
            self._record = record
            self._log.info("adopted running kubelet", pid=record.pid)
        else:
            self._log.info("kubelet recorded in pid file is gone", pid=record.pid)

    async def _adopt_unrecorded(self, argv: list[str], *, log_path: Path) -> bool:
        """Adopt a kubelet running exactly `argv` without a pid file (the service was killed between spawn and
        record), so a restart never starts a second kubelet."""
        # A /proc scan: in a thread, it reads a few files per process (issue 11: nothing blocks the loop).
        for proc in await asyncio.to_thread(hostprocs.running_program, Path(argv[0])):
            # A script's interpreter comes first in the kernel's cmdline: compare the tail. Other processes of
            # the same binary (the simulated node's static pods are one) have other arguments.
            if list(proc.cmdline[-len(argv):]) != argv:
                continue
            record = _Record(pid=proc.pid, start_ticks=proc.start_ticks, argv=argv, cmdline=list(proc.cmdline),
                             log_path=str(log_path))
            _write_record(self._pid_file, record)
            self._record, self._proc = record, None
            self._log.info("adopted running kubelet that had no pid file", pid=proc.pid)
            return True
        return False

    def _ensure_task(self) -> None:
        if self._task is not None and not self._task.done():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # constructed outside the loop: watching starts with the first call inside it
        self._task = asyncio.create_task(self._supervise(), name="kubelet-supervisor")

    async def _spawn(self, argv: list[str], *, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = await self._log_writer(log_path)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # not in our process group: a crash or ^C of the service spares it
            )
        finally:
            os.close(log_fd)  # the kubelet holds the only write end: the service keeps no fd per restart
        record = _Record(
            pid=proc.pid,
            start_ticks=_start_ticks(proc.pid) or 0,
            argv=argv,
            cmdline=await _settled_cmdline(proc.pid) or argv,
            log_path=str(log_path),
        )
        self._record, self._proc = record, proc  # tracked first: a cancellation during the write keeps it
        # With its fsync, off the loop (7 ms on it while image layers were written: issue 11's loop check).
        await asyncio.shield(asyncio.to_thread(_write_record, self._pid_file, record))
        self._log.info("started kubelet", pid=proc.pid, log_path=str(log_path))

    async def _log_writer(self, log_path: Path) -> int:
        """The fd the kubelet writes its output to: the write end of a pipe into lifecycle/logpipe.py, which
        rotates `log_path` by size (why a process of its own: see there); without rotation, the file itself."""
        if self._log_rotation is None:
            return os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        max_bytes, files = self._log_rotation
        read_fd, write_fd = os.pipe()
        try:
            # Its own session, as the kubelet's: it outlives the service with the kubelet and ends at the pipe's EOF
            # (the kubelet gone). -I: stdlib only, whatever the environment says.
            await asyncio.create_subprocess_exec(
                sys.executable, "-I", logpipe.__file__, "--path", str(log_path), "--max-bytes", str(max_bytes),
                "--files", str(files), stdin=read_fd, stdout=asyncio.subprocess.DEVNULL, start_new_session=True,
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        return write_fd

    def _log_writer_now(self, log_path: Path, *, env: Mapping[str, str]) -> int:
        """`_log_writer` without the event loop."""
        if self._log_rotation is None:
            return os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        max_bytes, files = self._log_rotation
        read_fd, write_fd = os.pipe()
        try:
            pipe = subprocess.Popen(
                [sys.executable, "-I", logpipe.__file__, "--path", str(log_path), "--max-bytes", str(max_bytes),
                 "--files", str(files)], stdin=read_fd, stdout=subprocess.DEVNULL, start_new_session=True,
                env=dict(env))
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        _reap_in_thread(pipe)
        return write_fd

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        backoff_s = self._min_backoff_s
        while True:
            record = self._record
            if record is None:
                return
            started_at = loop.time()
            exit_code: int | None = None
            if _alive(record):  # never wait on a pid the kernel has since given to someone else
                own = self._proc if self._proc is not None and self._proc.pid == record.pid else None
                exit_code = await _wait_exit(record.pid, proc=own)
            ran_s = loop.time() - started_at
            if ran_s >= self._stable_after_s:
                backoff_s = self._min_backoff_s
            self._log.warning("kubelet exited: restarting", pid=record.pid, exit_code=exit_code,
                              ran_s=round(ran_s, 1), backoff_s=backoff_s)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, self._max_backoff_s)
            try:
                await self._spawn(record.argv, log_path=Path(record.log_path))
            except OSError as exc:
                # Keep the old record: the next round waits (it is gone already) and tries again after backoff.
                self._log.error("kubelet could not be started", error=str(exc))
                continue
            self._restarts += 1


# ---- /proc helpers ---------------------------------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name in parens may hold spaces
    if fields[0] == "Z":
        return None  # exited, not yet reaped: as good as gone
    return int(fields[19])


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part] or None


async def _settled_cmdline(pid: int, *, timeout_s: float = 2.0) -> list[str] | None:
    """The command line of a child just spawned, once the kernel has written it. create_subprocess_exec returns
    when the child's exec has dropped the old memory (vfork's wake-up and the close-on-exec of Python's error pipe
    both happen in the kernel's begin_new_exec), before the new argv is laid out (create_elf_tables): a read in
    between finds /proc/<pid>/cmdline empty. Recording the configured argv instead made the supervisor take a
    live kubelet for gone and start a second one (seen under load)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (cmdline := _cmdline(pid)) is None and _start_ticks(pid) is not None and loop.time() < deadline:  # noqa: ASYNC110 (no event to wait on: the kernel's state, polled)
        await asyncio.sleep(0.005)
    return cmdline


def _settled_cmdline_now(pid: int, *, timeout_s: float = 2.0) -> list[str] | None:
    """`_settled_cmdline` without the event loop (Popen returns at the same point of the child's exec)."""
    deadline = time.monotonic() + timeout_s
    while (cmdline := _cmdline(pid)) is None and _start_ticks(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.005)
    return cmdline


def _reap_in_thread(child: subprocess.Popen[bytes]) -> None:
    """A child started outside the event loop is waited for by a thread of its own, so it never lingers as a
    zombie (which `_alive` already counts as gone): the supervisor's watch sees it exit through /proc."""
    threading.Thread(target=child.wait, name=f"reap-{child.pid}", daemon=True).start()


# /proc's start time and /proc/uptime count in 10 ms steps; a binary put in place this much after the kubelet
# started is newer than it for sure (the steps write binaries before they start the kubelet, never just after).
_START_SLACK_S = 0.5


def _replaced_since(binary: Path, *, started_at_s: float) -> bool:
    """The binary's inode changed (ctime: written, renamed into place or chmod-ed) after `started_at_s`. A ctime
    ahead of the clock says the clock went back since (a VM resumed): not judged, the kubelet is kept."""
    try:
        changed_s = binary.stat().st_ctime
    except OSError:
        return False  # gone: `start` reports the missing binary, not this
    return started_at_s + _START_SLACK_S < changed_s <= time.time()


def _alive(record: _Record) -> bool:
    return _start_ticks(record.pid) == record.start_ticks and _cmdline(record.pid) == record.cmdline


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return
        # The kubelet leads its own session; its static pods run in sessions of their own and stay up.
        if group == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


async def _wait_exit(pid: int, *, proc: asyncio.subprocess.Process | None) -> int | None:
    """Wait until `pid` exits; its exit code when it is our child, else None (adopted processes)."""
    if proc is not None:
        return await proc.wait()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return None


def _read_record(pid_file: Path) -> _Record | None:
    try:
        raw = json.loads(pid_file.read_text())
        return _Record(
            pid=int(raw["pid"]),
            start_ticks=int(raw["start_ticks"]),
            argv=[str(a) for a in raw["argv"]],
            cmdline=[str(a) for a in raw["cmdline"]],
            log_path=str(raw["log_path"]),
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # a torn or foreign file: treat as no kubelet, the next start rewrites it


def _write_record(pid_file: Path, record: _Record) -> None:
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = pid_file.with_name(f".{pid_file.name}.tmp")
    data = {"pid": record.pid, "start_ticks": record.start_ticks, "argv": record.argv,
            "cmdline": record.cmdline, "log_path": record.log_path}
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(pid_file)
