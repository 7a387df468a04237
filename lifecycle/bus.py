"""In-process fan-out of events and status from the engine to its subscribers (MQTT bridge, tests).

`publish` only appends to each subscriber's bounded buffer: it never blocks and never raises, so a slow or
broken subscriber cannot stall or fail the engine. A full buffer drops its oldest item and counts the drop,
except a durable event (a state change or a failure, lifecycle.outbox): those are never dropped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import structlog

from lifecycle.exposures import ExposureSet
from lifecycle.outbox import is_durable
from lifecycle.protocol import Event, EventType, Status

BusItem = Event | Status | ExposureSet  # ExposureSet: the retained exposures message (seq None: clear it)
_log = structlog.get_logger("lifecycle.bus")


class Subscription:
    """One subscriber's buffer. A consumer `peek`s and `pop`s an item only once it has delivered it (the MQTT
    bridge keeps undelivered items across broker outages this way)."""

    def __init__(self, *, name: str, max_items: int) -> None:
        self.name = name
        self.dropped = 0
        # Called after each item is buffered, synchronously (the MQTT bridge hands it to the broker's socket right
        # there, instead of when its task next runs); it must not raise.
        self.on_offer: Callable[[], None] | None = None
        self._items: deque[BusItem] = deque()
        self._max_items = max_items
        self._changed = asyncio.Event()
        self._emptied = asyncio.Event()
        self._emptied.set()

    def offer(self, item: BusItem) -> None:
        if len(self._items) >= self._max_items and self._drop_oldest_droppable():
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                _log.warning("subscriber buffer full, dropping oldest", subscriber=self.name, dropped=self.dropped)
        self._items.append(item)
        self._changed.set()
        self._emptied.clear()
        if self.on_offer is not None:
            self.on_offer()

    def _drop_oldest_droppable(self) -> bool:
        for index, queued in enumerate(self._items):  # durable events are few: this finds one at once
            if not is_durable(queued):
                del self._items[index]
                return True
        return False

    def peek(self) -> BusItem | None:
        return self._items[0] if self._items else None

    def pop(self) -> BusItem:
        item = self._items.popleft()
        if not self._items:
            self._changed.clear()
            self._emptied.set()
        return item

    def requeue(self, items: list[BusItem]) -> None:
        """Put items taken earlier back at the front, in their order (they were sent but not acknowledged)."""
        if not items:
            return
        self._items.extendleft(reversed(items))
        self._changed.set()
        self._emptied.clear()

    def __len__(self) -> int:
        return len(self._items)

    async def wait(self) -> None:
        """Return once at least one item is buffered."""
        while not self._items:
            self._changed.clear()
            await self._changed.wait()

    async def drained(self) -> None:
        """Return once every buffered item has been taken."""
        await self._emptied.wait()

    async def state_changed(self) -> None:
        """Take items until a state change was among them (the watchers wake on those and need nothing else)."""
        while True:
            await self.wait()
            changed = False
            while self._items:
                item = self.pop()
                changed |= isinstance(item, Event) and item.type == EventType.STATE_CHANGED
            if changed:
                return


class Bus:
    def __init__(self) -> None:
        self._subscribers: list[Subscription] = []

    def subscribe(self, name: str, *, max_items: int = 10_000) -> Subscription:
        sub = Subscription(name=name, max_items=max_items)
        self._subscribers.append(sub)
        return sub

    def publish(self, item: BusItem) -> None:
        """On the event loop's thread only (as every caller is: the engine, whose steps' threads report through
        `call_soon_threadsafe`): the buffers' events are asyncio's, and an `on_offer` writes to the broker's
        socket."""
        for sub in list(self._subscribers):
            try:
                sub.offer(item)
            except Exception:  # a subscriber must never fail the engine; offer() is plain deque work
                _log.exception("subscriber failed to take an item", subscriber=sub.name)
