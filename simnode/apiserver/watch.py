"""Watch streams: chunked JSON lines `{"type": ..., "object": ...}` from the store's event fan-out."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from simnode.apiserver.errors import bad_request
from simnode.apiserver.resources import ResourceType
from simnode.apiserver.store import Event, Obj, Store, WatchTooOld

log = logging.getLogger(__name__)

BOOKMARK_INTERVAL_S = 60.0


@dataclass
class WatchRequest:
    rt: ResourceType
    matches: Callable[[Obj], bool]  # namespace, name and selectors
    resource_version: str
    timeout_s: float
    bookmarks: bool
    send_initial: bool
    render: Callable[[Obj, bool], Obj]  # (object, first) -> what goes into the event


def parse_timeout(text: str | None) -> float:
    if text is None or text == "":
        return random.uniform(1800, 3600)  # like --min-request-timeout=1800 times [1, 2)
    try:
        value = int(text)
    except ValueError:
        raise bad_request(f"invalid timeoutSeconds {text!r}: expected an integer") from None
    return float(value) if value > 0 else random.uniform(1800, 3600)


def _translate(event: Event, matches: Callable[[Obj], bool]) -> str | None:
    now = matches(event.obj)
    if event.type == "MODIFIED":
        before = event.prev is not None and matches(event.prev)
        if now and before:
            return "MODIFIED"
        if now:
            return "ADDED"
        return "DELETED" if before else None
    return event.type if now else None


async def serve_watch(
    request: web.BaseRequest, store: Store, wr: WatchRequest, stopping: asyncio.Event
) -> web.StreamResponse:
    rv_text = wr.resource_version
    initial: list[Obj] = []
    since: int | None = None
    if wr.send_initial or rv_text in ("", "0"):
        initial = [o for o in store.iter_resource(wr.rt.key) if wr.matches(o)]
        initial = json.loads(json.dumps(initial))  # copies, taken atomically with the registration below
    else:
        try:
            since = int(rv_text)
        except ValueError:
            raise bad_request(f"invalid resourceVersion {rv_text!r}") from None
    response = web.StreamResponse(headers={"Content-Type": "application/json", "Cache-Control": "no-cache, private"})
    response.enable_chunked_encoding()
    try:
        watcher, backlog = store.watch(wr.rt.key, since)
    except WatchTooOld as exc:
        await response.prepare(request)
        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": str(exc), "reason": "Expired", "code": 410}
        await response.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
        await response.write_eof()
        return response
    try:
        await response.prepare(request)
        first = True

        async def send(kind: str, obj: Obj) -> None:
            nonlocal first
            body = obj if kind == "BOOKMARK" else wr.render(obj, first)
            if kind != "BOOKMARK":
                first = False
            await response.write(json.dumps({"type": kind, "object": body}, separators=(",", ":")).encode() + b"\n")

        for obj in initial:
            await send("ADDED", obj)
        if wr.send_initial and wr.bookmarks:
            await send("BOOKMARK", _bookmark(wr.rt, store.resource_version, initial_end=True))
        for event in backlog:
            if (kind := _translate(event, wr.matches)) is not None:
                await send(kind, event.obj)
        deadline = time.monotonic() + wr.timeout_s
        while not stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = await asyncio.wait_for(watcher.queue.get(), timeout=min(remaining, BOOKMARK_INTERVAL_S))
            except TimeoutError:
                if wr.bookmarks and deadline - time.monotonic() > 0:
                    await send("BOOKMARK", _bookmark(wr.rt, store.resource_version))
                continue
            if item is None:
                break  # shutdown or the watcher fell too far behind
            if (kind := _translate(item, wr.matches)) is not None:
                await send(kind, item.obj)
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass  # the client went away
    finally:
        store.unwatch(watcher)
    return response


def _bookmark(rt: ResourceType, rv: int, *, initial_end: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"resourceVersion": str(rv)}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}
