"""The durable outbox: state changes and step failures are written to `<state dir>/outbox` before they are
published, and published again after a restart until the broker acknowledged them (QoS 1 PUBACK).

Leaves `outbox` (one JSON line per unacknowledged event, emptied once all are acknowledged) and `outbox.acked`
(the seq of the last acknowledged one). The append is one write() on the loop (~10 us, like the `seq` file), so
a SIGKILL right after it loses nothing, and the bridge may publish it from then on; the fsync, for a power
loss, starts at once in a thread of its own, batched (one fsync covers every append before it). A power loss
within those milliseconds may forget a change a host has already heard: the restarted service then makes it
again under the same `state_seq` (docs/protocol.md).

A state change's record also holds state.json's new content (`snapshot`): the change is published, then
`state.json` (lifecycle.store) replaced on the loop in the same callback (a write and a rename); a kill in
between finds the file one change behind, and the restart takes the record's (`last_snapshot`, lifecycle.engine
`_newer_in_outbox`). The file's fsyncs run in `checkpoint`, in the same thread, after the fsync of every event
appended before it, so the loop never waits for the disk and the file is never durable ahead of the outbox.
The outbox is emptied only once the broker acknowledged everything in it *and* every checkpoint handed in is
done.

Progress events stay in memory: a subscriber sees a gap in `seq` when some were lost, and state changes carry
`state_seq` (no gap there: see docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lifecycle.logging import get_logger
from lifecycle.protocol import Event, EventType, dumps

# What a host must never miss; everything else may be dropped (and shows as a gap in `seq`).
DURABLE_EVENTS = frozenset({EventType.STATE_CHANGED, EventType.STEP_FAILED})


def is_durable(item: object) -> bool:
    return isinstance(item, Event) and item.type in DURABLE_EVENTS


def _event_to_json(event: Event, snapshot: dict[str, Any] | None) -> dict[str, Any]:
    record = {"type": event.type.value, "seq": event.seq, "time_s": event.time_s, "id": event.id, "data": event.data}
    if snapshot is not None:
        record["snapshot"] = snapshot
    return record


def _event_from_json(raw: Any) -> Event:
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict) or not isinstance(raw.get("seq"), int):
        raise TypeError("not an outbox record")
    return Event(type=EventType(raw["type"]), seq=raw["seq"], data=raw["data"], time_s=float(raw["time_s"]),
                 id=str(raw["id"]))


class Outbox:
    """Open with `open()` (returns what is still to deliver); `append` on the event loop."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "outbox"
        self.acked_path = directory / "outbox.acked"
        self._fd: int | None = None
        self._acked_fd: int | None = None
        self._written_seq = 0  # last seq appended (in the page cache)
        self._synced_seq = 0  # last seq known to be on disk
        self._acked_seq = 0
        self.last_seq = 0  # the highest `seq` and `state_seq` read back by `open()`
        self.last_state_seq = 0
        # The state file's content in the newest state change's record read back by `open()` (None when that
        # record holds none: an older version's): the engine takes it when state.json is older (a kill between
        # the publish and the replace of state.json).
        self.last_snapshot: dict[str, Any] | None = None
        # One thread for the fsyncs, not the loop's default pool: an fsync must never queue behind minutes of
        # hashing or extraction there. Started from `append` itself, so the fsync runs while the engine goes on
        # writing state.json (a task would only start once the engine yields: ~1 ms later, measured).
        self._fsyncer: ThreadPoolExecutor | None = None
        self._syncing: asyncio.Future[None] | None = None
        self._checkpoints: set[asyncio.Future[None]] = set()  # handed to the thread, not done yet
        self._file_lock = threading.Lock()
        self._log = get_logger("lifecycle.outbox")

    def open(self) -> list[Event]:
        """Open the files; return the events written but never acknowledged, oldest first. A torn last line (a
        crash mid-write) or an unreadable one is skipped with a log line: it never stops the service."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._acked_fd = os.open(self.acked_path, os.O_RDWR | os.O_CREAT, 0o644)
        text = os.pread(self._acked_fd, 32, 0).decode(errors="replace").strip()
        self._acked_seq = int(text) if text.isdigit() else 0
        pending: list[Event] = []
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                raw = json.loads(line)
                event = _event_from_json(raw)
            except (ValueError, KeyError, TypeError) as exc:
                self._log.warning("skipping an unreadable outbox record", error=str(exc), record=line[:80])
                continue
            self.last_seq = max(self.last_seq, event.seq)
            state_seq = event.data.get("state_seq")
            if isinstance(state_seq, int) and state_seq >= self.last_state_seq:
                self.last_state_seq = state_seq
                snapshot = raw.get("snapshot")
                self.last_snapshot = snapshot if isinstance(snapshot, dict) else None
            if event.seq > self._acked_seq:
                pending.append(event)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._fsyncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lifecycle-outbox-fsync")
        if not pending:
            os.ftruncate(self._fd, 0)  # nothing left to deliver: start the file afresh
        last = max((event.seq for event in pending), default=self._acked_seq)
        self._written_seq = self._synced_seq = last  # what was read back is on disk (or the kernel has it)
        if pending:
            self._log.info("re-publishing unacknowledged events", count=len(pending),
                           seqs=[event.seq for event in pending])
        return pending

    def close(self) -> None:
        if self._fsyncer is not None:  # what was handed to the thread (a state file save) is finished first
            self._fsyncer.shutdown(wait=True)
            self._fsyncer = None
        if self._fd is not None and self._synced_seq < self._written_seq:
            with contextlib.suppress(OSError):  # appended without a loop to start the fsync (or after the last)
                os.fsync(self._fd)
        for fd in (self._fd, self._acked_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._acked_fd = None

    def append(self, event: Event, *, snapshot: dict[str, Any] | None = None) -> None:
        """Write the event before it is published (one write: O_APPEND keeps a line whole between processes);
        a state change with the state file's new content (`snapshot`), written to state.json only after the
        publish."""
        if self._fd is None:
            return  # not opened (a service without an outbox): the event is published from memory only
        try:
            with self._file_lock:  # never while the thread empties the file (held for an ftruncate, rarely)
                os.write(self._fd, dumps(_event_to_json(event, snapshot)) + b"\n")
                self._written_seq = max(self._written_seq, event.seq)
        except OSError as exc:  # a full disk must not stop the engine: the event still goes out from memory
            self._log.error("could not write an event to the outbox", seq=event.seq, error=str(exc))
            return
        self._start_fsync()

    def _start_fsync(self) -> None:
        """fsync what was appended, in the outbox's thread; one at a time (the next covers every append made
        meanwhile). Without a running loop (a caller outside the service) the next `checkpoint` or `close`
        covers it."""
        if self._syncing is not None or self._fd is None or self._fsyncer is None:
            return
        if self._synced_seq >= self._written_seq:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        fd, target = self._fd, self._written_seq
        self._syncing = syncing = loop.run_in_executor(self._fsyncer, os.fsync, fd)
        syncing.add_done_callback(lambda done: self._fsynced(done, target))

    def _fsynced(self, done: asyncio.Future[None], target: int) -> None:
        self._syncing = None
        if done.cancelled():
            return
        error = done.exception()
        if error is not None:  # the write itself reached the kernel: a crash of the service loses nothing
            self._log.error("outbox fsync failed", error=str(error))
        self._mark_synced(target)
        self._start_fsync()  # appended while this one ran

    def acknowledged(self, seq: int) -> None:
        """The broker has the event `seq` (PUBACK): record it; empty the file once nothing is left to deliver."""
        if self._acked_fd is None or seq <= self._acked_seq:
            return
        self._acked_seq = seq
        try:
            os.pwrite(self._acked_fd, f"{seq:020d}\n".encode(), 0)  # fixed width, in place; lost: a resend
        except OSError as exc:  # the next start publishes it again: a repeat, never a loss
            self._log.error("could not record an acknowledgement in the outbox", seq=seq, error=str(exc))
            return
        self._empty_if_done()

    def _empty_if_done(self) -> None:
        """Empty the file once the broker has everything in it and state.json has caught up with it: in the
        outbox's thread (an ftruncate took 4 ms on the loop while image layers were written), and only if nothing
        was appended meanwhile (`append` and the truncation hold `_file_lock`)."""
        if self._fd is None or self._acked_seq < self._written_seq or self._checkpoints:
            return
        fd, fsyncer, emptied_at = self._fd, self._fsyncer, self._written_seq

        def empty() -> None:
            with self._file_lock:
                if self._written_seq != emptied_at:
                    return  # a newer event is in the file: the next acknowledgement empties it
                try:
                    os.ftruncate(fd, 0)
                except OSError as exc:  # the next start publishes what is left again: a repeat, never a loss
                    self._log.error("could not empty the outbox", error=str(exc))

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            fsyncer = None  # a caller outside the service: nothing to keep free
        if fsyncer is None:
            empty()
        else:
            fsyncer.submit(empty)

    def checkpoint(self, save: Callable[[], None]) -> None:
        """Run `save` (the state file's fsyncs) in the outbox's thread, after an fsync of everything appended
        so far. Without a running loop, or once closed, `save` runs here."""
        fd, fsyncer, target = self._fd, self._fsyncer, self._written_seq
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if fd is None or fsyncer is None or loop is None:
            save()
            return
        running_loop = loop

        def in_thread() -> None:
            try:
                os.fsync(fd)
            except OSError as exc:
                self._log.error("outbox fsync failed", error=str(exc))
            running_loop.call_soon_threadsafe(self._mark_synced, target)
            save()

        done = loop.run_in_executor(fsyncer, in_thread)
        self._checkpoints.add(done)
        done.add_done_callback(self._checkpointed)

    def _mark_synced(self, target: int) -> None:
        self._synced_seq = max(self._synced_seq, target)

    def _checkpointed(self, done: asyncio.Future[None]) -> None:
        self._checkpoints.discard(done)
        if not done.cancelled() and done.exception() is not None:  # state.json keeps the previous state: the
            # outbox keeps the change (not emptied while this is the newest), a restart resumes from both
            self._log.error("could not save the state file", error=str(done.exception()))
        self._empty_if_done()

    async def checkpoints_done(self) -> None:
        """Return once every checkpoint handed in so far is on disk (or failed and said so)."""
        while self._checkpoints:
            await asyncio.wait(set(self._checkpoints))
