"""A service that has nothing to do uses no CPU: after an install's burst of events, replies and status
publishes (the two write paths to the broker: paho writing the outbox's events itself, aiomqtt's publish for
the rest), the event loop sleeps in epoll_wait instead of running a write callback on an always-writable socket.
Real Mosquitto (the one the tests run), the real service in this process with steered steps."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from lifecycle_fakes import steer
from lifecycle_mqtt import probe, service_config, service_in_process, unique_prefix

from lifecycle.config import STEP_NAMES

IDLE_S = 1.5
# The loop's own CPU while nothing happens: aiomqtt's 1 s misc timer and the status ticks take well under 5 %;
# the spinning write callback took all of it (~100 %).
IDLE_CPU_FRACTION_MAX = 0.2


def _writers(loop: asyncio.AbstractEventLoop) -> list[int]:
    """File descriptors the loop's selector watches for writing."""
    selector = loop._selector  # type: ignore[attr-defined]
    return [key.fd for key in selector.get_map().values() if key.events & 2]  # selectors.EVENT_WRITE


async def test_after_an_install_the_loop_sleeps_and_watches_no_socket_for_writing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = service_config(root, prefix=unique_prefix("idle"))
    for name in STEP_NAMES:
        steer(root, name, run_s=0.05, progress=20)  # bursts of events between the status publishes
    async with service_in_process(config) as svc, probe(svc.topics) as p:
        await p.ready()
        for attempt in range(3):  # install, reset, install: replies, status and events interleave many times
            action = "reset" if attempt == 1 else "install"
            assert (await p.ask({"id": f"r-{attempt}", "action": action}))["ok"]
            target, request_id = ("idle" if action == "reset" else "running"), f"r-{attempt}"
            await p.wait_for(lambda m, t=target, r=request_id: m.topic == svc.topics.events  # type: ignore[misc]
                             and m.json()["type"] == "lifecycle.state.changed"
                             and (m.json()["data"]["to"], m.json()["data"]["request_id"]) == (t, r), timeout_s=20)
            await p.ask({"id": f"s-{attempt}", "action": "status"})
        await asyncio.sleep(0.3)  # the last PUBACKs and the status publish settle
        loop = asyncio.get_running_loop()
        cpu_before, wall_before = time.thread_time(), time.monotonic()
        await asyncio.sleep(IDLE_S)
        cpu_s, wall_s = time.thread_time() - cpu_before, time.monotonic() - wall_before
        writers = _writers(loop)
    fraction = cpu_s / wall_s
    print(f"loop thread idle: {cpu_s * 1000:.0f} ms of CPU in {wall_s:.2f} s ({fraction:.0%}); "
          f"writers {writers}; pid {os.getpid()}")
    assert writers == [], f"the loop watches {writers} for writing with nothing to write"
    assert fraction < IDLE_CPU_FRACTION_MAX, f"the idle loop used {fraction:.0%} of a CPU"
