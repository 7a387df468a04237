"""Keeps the store on disk "as etcd would": `<root>/var/lib/etcd/simnode-store/snapshot.json`.

A snapshot of all objects and the resourceVersion counter is written atomically (tmp + fsync + rename) at
most every 200 ms while there are changes, and once more on shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from simnode.apiserver.store import Key, Obj, Store

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "snapshot.json"
FORMAT_VERSION = 1


class StoreFileError(Exception):
    """The snapshot exists but cannot be read."""


def load(directory: Path) -> Store:
    path = directory / SNAPSHOT_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return Store()
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreFileError(f"{path}: cannot read the store snapshot: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
        raise StoreFileError(f"{path}: not a simnode store snapshot (format {FORMAT_VERSION})")
    objects: dict[Key, Obj] = {}
    for entry in raw.get("objects", []):
        resource, obj = entry["resource"], entry["object"]
        m = obj["metadata"]
        objects[(resource, m.get("namespace", ""), m["name"])] = obj
    return Store(objects, int(raw["resourceVersion"]))


def write_snapshot(directory: Path, store: Store) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    body: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "resourceVersion": store.resource_version,
        "objects": [{"resource": k[0], "object": v} for k, v in sorted(store.objects.items())],
    }
    data = json.dumps(body, separators=(",", ":")).encode()
    tmp = directory / (SNAPSHOT_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(directory / SNAPSHOT_NAME)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Persister:
    """Batches store changes into snapshots."""

    def __init__(self, directory: Path, store: Store, interval_s: float = 0.2) -> None:
        self.directory = directory
        self.store = store
        self.interval_s = interval_s
        self._wake = asyncio.Event()
        store.on_change = self._wake.set

    def flush(self) -> None:
        if self.store.dirty:
            self.store.dirty = False
            write_snapshot(self.directory, self.store)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self.flush()
            except OSError:
                # Keep serving; the next change retries, and shutdown flushes again.
                self.store.dirty = True
                log.exception("writing the store snapshot failed")
            await asyncio.sleep(self.interval_s)
