"""A list+watch cache of one resource collection (a small client-go informer). Keeps objects in
memory only; relists after an expired resourceVersion or a lost connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from simnode.kubeclient import ApiError, KubeClient

log = logging.getLogger("informer")

WATCH_TIMEOUT_S = 30.0  # server closes each watch after this long; we then continue from the last rv
RETRY_S = 1.0

Obj = dict[str, Any]


def obj_key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


class Informer:
    """`run()` keeps `items` in sync with the API; `changed` is set after every change."""

    def __init__(
        self,
        client: KubeClient,
        path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        predicate: Callable[[Obj], bool] | None = None,
        on_event: Callable[[str, Obj], None] | None = None,
    ) -> None:
        self.client = client
        self.path = path
        self.label_selector = label_selector
        self.field_selector = field_selector
        # Applied client-side too, so the cache is right even if the server ignores a field selector.
        self.predicate = predicate or (lambda _obj: True)
        self.on_event = on_event
        self.items: dict[str, Obj] = {}
        self.synced = asyncio.Event()
        self.changed = asyncio.Event()
        self.resource_version: str | None = None

    def get(self, key: str) -> Obj | None:
        return self.items.get(key)

    def values(self, namespace: str | None = None) -> list[Obj]:
        if namespace is None:
            return list(self.items.values())
        return [o for o in self.items.values() if (o.get("metadata") or {}).get("namespace") == namespace]

    def upsert(self, obj: Obj) -> None:
        """Record our own write at once, so the next sync does not act on a stale copy."""
        if self.predicate(obj):
            self.items[obj_key(obj)] = obj
            self.changed.set()

    def forget(self, obj: Obj) -> None:
        self.items.pop(obj_key(obj), None)
        self.changed.set()

    async def run(self) -> None:
        while True:
            try:
                await self._list()
                while True:
                    await self._watch()
            except ApiError as exc:
                level = logging.DEBUG if exc.status in (0, 410) else logging.WARNING
                log.log(level, "%s: %s; relisting", self.path, exc)
            await asyncio.sleep(RETRY_S)

    async def _list(self) -> None:
        body = await self.client.list(
            self.path, label_selector=self.label_selector, field_selector=self.field_selector
        )
        items: dict[str, Obj] = {}
        for obj in body.get("items") or []:
            if self.predicate(obj):
                items[obj_key(obj)] = obj
        self.items = items
        self.resource_version = (body.get("metadata") or {}).get("resourceVersion")
        self.synced.set()
        self.changed.set()
        for obj in list(items.values()):
            self._notify("ADDED", obj)

    async def _watch(self) -> None:
        async for event in self.client.watch(
            self.path,
            resource_version=self.resource_version,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            timeout_s=WATCH_TIMEOUT_S,
        ):
            kind = event.get("type")
            obj = event.get("object") or {}
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            if rv:
                self.resource_version = rv
            if kind == "BOOKMARK":
                continue
            key = obj_key(obj)
            if kind == "DELETED" or not self.predicate(obj):
                existed = self.items.pop(key, None) is not None
                if existed:
                    self._notify("DELETED", obj)
            else:
                self.items[key] = obj
                self._notify(str(kind), obj)
            self.changed.set()

    def _notify(self, kind: str, obj: Obj) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, obj)
            except Exception:  # a handler bug must not kill the cache
                log.exception("event handler failed for %s %s", kind, obj_key(obj))
