"""In-memory object store with a global resourceVersion counter, event history and watch fan-out.

All mutations run on the event loop thread without awaiting, so each is atomic with respect to watchers.
Persistence (persist.py) snapshots `objects` and `resource_version` whenever `dirty` is set.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]
Key = tuple[str, str, str]  # (resource key, namespace or "", name)

log = logging.getLogger(__name__)

HISTORY_EVENTS = 10_000  # watch replay window; older resourceVersions get 410 Gone
WATCH_QUEUE_MAX = 50_000  # a watcher this far behind is cut off (the client re-lists)


@dataclass(frozen=True)
class Event:
    rv: int
    resource: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj
    prev: Obj | None  # the object before a MODIFIED


@dataclass(eq=False)
class Watcher:
    resource: str
    queue: asyncio.Queue[Event | None] = field(default_factory=lambda: asyncio.Queue[Event | None]())
    overflowed: bool = False

    def offer(self, event: Event | None) -> None:
        if self.overflowed:
            return
        if self.queue.qsize() >= WATCH_QUEUE_MAX:
            # None wakes the reader, which then sees `overflowed` and ends the watch.
            self.overflowed = True
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(event)


class WatchTooOld(Exception):
    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")


def meta(obj: Obj) -> dict[str, Any]:
    m = obj.get("metadata")
    assert isinstance(m, dict)
    return m


class Store:
    def __init__(self, objects: dict[Key, Obj] | None = None, resource_version: int = 0) -> None:
        self.objects: dict[Key, Obj] = objects or {}
        self.resource_version = resource_version
        # Replay is complete for any rv >= history_start (after a restart: the loaded rv).
        self.history_start = resource_version
        self.history: deque[Event] = deque(maxlen=HISTORY_EVENTS)
        self.watchers: set[Watcher] = set()
        self.dirty = False
        self.on_change: Callable[[], None] | None = None

    # -- reads (callers get copies, never the stored dicts) --

    def get(self, key: Key) -> Obj | None:
        obj = self.objects.get(key)
        return copy.deepcopy(obj) if obj is not None else None

    def peek(self, key: Key) -> Obj | None:
        """The stored dict itself, for read-only checks that must not pay for a copy."""
        return self.objects.get(key)

    def iter_resource(self, resource: str, namespace: str | None = None) -> Iterator[Obj]:
        """Stored dicts of one resource (read-only), sorted by namespace and name like etcd keys."""
        keys = sorted(k for k in self.objects if k[0] == resource and (namespace is None or k[1] == namespace))
        for k in keys:
            yield self.objects[k]

    # -- writes --

    def next_rv(self) -> int:
        self.resource_version += 1
        return self.resource_version

    def put(self, resource: str, obj: Obj, prev: Obj | None) -> Obj:
        """Store obj (a fresh resourceVersion is assigned) and notify watchers; returns a copy."""
        m = meta(obj)
        rv = self.next_rv()
        m["resourceVersion"] = str(rv)
        key = (resource, m.get("namespace", ""), m["name"])
        self.objects[key] = obj
        self._emit(Event(rv, resource, "MODIFIED" if prev is not None else "ADDED", obj, prev))
        return copy.deepcopy(obj)

    def delete(self, resource: str, key: Key) -> Obj:
        obj = self.objects.pop(key)
        rv = self.next_rv()
        final = copy.deepcopy(obj)
        meta(final)["resourceVersion"] = str(rv)
        self._emit(Event(rv, resource, "DELETED", final, None))
        return copy.deepcopy(final)

    def _emit(self, event: Event) -> None:
        self.history.append(event)
        if len(self.history) == self.history.maxlen:
            self.history_start = max(self.history_start, self.history[0].rv - 1)
        self.dirty = True
        if self.on_change is not None:
            self.on_change()
        for w in list(self.watchers):
            if w.resource == event.resource:
                w.offer(event)

    # -- watch --

    def watch(self, resource: str, since_rv: int | None) -> tuple[Watcher, list[Event]]:
        """Register a watcher; returns it with the history events after since_rv (none if since_rv is None)."""
        backlog: list[Event] = []
        if since_rv is not None:
            if since_rv < self.history_start:
                raise WatchTooOld(since_rv, self.history_start + 1)
            backlog = [e for e in self.history if e.rv > since_rv and e.resource == resource]
        w = Watcher(resource)
        self.watchers.add(w)
        return w, backlog

    def unwatch(self, w: Watcher) -> None:
        self.watchers.discard(w)

    def close_watchers(self) -> None:
        for w in list(self.watchers):
            w.queue.put_nowait(None)
        self.watchers.clear()
