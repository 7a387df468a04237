"""The engine's snapshot in `<root>/var/lib/lifecycle/`: `state.json` replaced atomically and fsynced at every
state change (replaced on the loop, fsynced in the outbox's thread when the service runs with one:
lifecycle.outbox); `seq`, the last event
number, overwritten in place per event (~10 us, survives a process crash, not a power loss: an fsync per
progress event would stall the loop ~20 ms); `lock`, one service per root."""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lifecycle.protocol import ErrorInfo
from lifecycle.step import ClusterParams

FORMAT_VERSION = 1
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


class StoreError(Exception):
    """The state file cannot be read or the state directory is in use; the message names the file."""


@dataclass(frozen=True)
class Snapshot:
    state: str
    since: float  # epoch seconds when `state` was entered
    seq: int  # last event sequence number handed out
    request_id: str | None = None  # the install or reset that led here
    cluster: ClusterParams | None = None  # fixed when an install starts, cleared by a reset
    step: int | None = None  # 1-based plan index of the state's step; in `failed`, the step that failed
    error: ErrorInfo | None = None
    state_seq: int = 0  # state changes made so far: the `state_seq` of the last `lifecycle.state.changed`

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "state": self.state,
            "since": self.since,
            "seq": self.seq,
            "state_seq": self.state_seq,
            "request_id": self.request_id,
            "kubernetes_version": self.cluster.kubernetes_version if self.cluster else None,
            "cluster": self.cluster.to_json() if self.cluster else None,
            "step": self.step,
            "error": self.error.to_json() if self.error else None,
        }


def _typed(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    value = raw.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{key!r}: unexpected value {value!r}")
    return value


def _cluster_from_json(raw: Any) -> ClusterParams | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError("'cluster' must be an object")
    return ClusterParams(
        kubernetes_version=_typed(raw, "kubernetes_version", str),
        api_port=_typed(raw, "api_port", int),
        kubelet_healthz_port=_typed(raw, "kubelet_healthz_port", int),
        # absent in state written before the key existed: kubeadm's default
        etcd_metrics_port=_typed(raw, "etcd_metrics_port", int) if "etcd_metrics_port" in raw else 2381,
        node_ip=_typed(raw, "node_ip", str) if "node_ip" in raw else "",  # absent before: the config's applies
    )


def snapshot_from_json(raw: Any, *, known_states: set[str]) -> Snapshot:
    if not isinstance(raw, dict):
        raise TypeError("expected a JSON object")
    if raw.get("format") != FORMAT_VERSION:
        raise ValueError(f"unknown format {raw.get('format')!r} (this service writes {FORMAT_VERSION})")
    state = _typed(raw, "state", str)
    if state not in known_states:
        raise ValueError(f"unknown state {state!r}")
    error = raw.get("error")
    if error is not None and not isinstance(error, dict):
        raise TypeError("'error' must be an object")
    return Snapshot(
        state=state,
        since=float(_typed(raw, "since", (int, float))),
        seq=_typed(raw, "seq", int),
        request_id=_typed(raw, "request_id", str, optional=True),
        cluster=_cluster_from_json(raw.get("cluster")),
        step=_typed(raw, "step", int, optional=True),
        error=ErrorInfo.from_json(error) if error is not None else None,
        state_seq=_typed(raw, "state_seq", int) if "state_seq" in raw else 0,  # absent before: counted from here
    )


def _without_surrogates(value: Any) -> Any:
    """`value` with lone UTF-16 surrogates in its strings replaced by U+FFFD. Requests holding them are refused
    now, but a state file saved before (a reset's `\\ud800` id) must not stop every later start at the first
    status publish, which could not encode it."""
    if isinstance(value, str):
        return _SURROGATE_RE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_surrogates(v) for v in value]
    return value


class Store:
    def __init__(self, path: Path, *, known_states: set[str]) -> None:
        self.path = path
        self._known_states = known_states
        self._lock_fd: int | None = None
        self._seq_fd: int | None = None

    def lock(self) -> None:
        """Hold an exclusive lock on the state directory for the life of the process (one service per root)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.parent / "lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(f"{lock_path}: another lifecycle service (pid {holder}) uses this root") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the root (and the sequence file) at exit."""
        if self._seq_fd is not None:
            os.close(self._seq_fd)
            self._seq_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def load(self) -> Snapshot | None:
        """The last saved snapshot with the last sequence number handed out; None if nothing was ever saved.
        StoreError (naming the file) if a file is unreadable: nothing is changed then."""
        seq = self._read_seq()
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return Snapshot(state="idle", since=time.time(), seq=seq) if seq else None
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read: {exc}") from exc
        try:
            snapshot = snapshot_from_json(_without_surrogates(json.loads(text)), known_states=self._known_states)
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            raise StoreError(f"{self.path}: not a valid state file: {exc}") from exc
        return replace(snapshot, seq=max(seq, snapshot.seq))

    @property
    def seq_path(self) -> Path:
        return self.path.parent / "seq"

    def _read_seq(self) -> int:
        try:
            text = self.seq_path.read_text()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StoreError(f"{self.seq_path}: cannot read: {exc}") from exc
        try:
            return int(text.strip() or "0")
        except ValueError:
            raise StoreError(f"{self.seq_path}: not a sequence number: {text[:40]!r}") from None

    def save_seq(self, seq: int) -> None:
        """Record the last event sequence number handed out (a single in-place write)."""
        if self._seq_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._seq_fd = os.open(self.seq_path, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(self._seq_fd, f"{seq:020d}\n".encode(), 0)  # fixed width: never a shorter, torn-looking file

    def save(self, snapshot: Snapshot) -> None:
        """Replace state.json atomically and durably (and the sequence number with it)."""
        self.save_seq(snapshot.seq)
        self._replace(snapshot.to_json(), durable=True)
        self._sync_directory()

    def replace(self, snapshot: Snapshot, *, content: dict[str, Any] | None = None) -> None:
        """Replace state.json atomically, without waiting for the disk: what a kill of the process (not a power
        loss) finds afterwards. `sync` makes it durable, from a thread (lifecycle.outbox's `checkpoint`).
        `content`: `snapshot.to_json()`, when the caller made it already (the engine, for the outbox's record)."""
        self._replace(snapshot.to_json() if content is None else content, durable=False)

    def sync(self) -> None:
        """fsync state.json and its directory (after `replace`)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._sync_directory()

    def _replace(self, content: dict[str, Any], *, durable: bool) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{self.path.name}.{os.getpid()}.tmp"
        data = json.dumps(content, indent=1, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)  # the rename must never expose a file whose data is not on disk yet
        finally:
            os.close(fd)
        # Without the fsync first, ext4 (auto_da_alloc, the default) still writes the data before a rename that
        # replaces a file; `sync` follows within milliseconds.
        tmp.replace(self.path)

    def _sync_directory(self) -> None:
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
