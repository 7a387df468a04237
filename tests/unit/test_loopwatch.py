"""lifecycle.loopwatch: a callback that holds the loop on the CPU is reported as blocked, by name; one that only
waits (a sleep, as when the OS deschedules the thread) is reported as slow, not blocked; nothing when stopped."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from lifecycle.loopwatch import heartbeat, watch_callbacks


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_a_cpu_bound_callback_is_reported_as_blocked_with_its_task_name() -> None:
    reports: list[tuple[str, dict[str, Any]]] = []
    stop = watch_callbacks(0.05, report=lambda message, fields: reports.append((message, fields)))

    async def hog() -> None:
        _spin(0.08)
        await asyncio.sleep(0)

    async def sleeper() -> None:
        time.sleep(0.08)  # noqa: ASYNC251  # wall time, no CPU: not the callback's fault, so "slow" only
        await asyncio.sleep(0)

    try:
        await asyncio.create_task(hog(), name="the-hog")
        await asyncio.create_task(sleeper(), name="the-sleeper")
    finally:
        stop()
    await asyncio.create_task(hog(), name="unwatched")  # stopped: no report
    by_task = {fields["callback"].split("'")[1]: (message, fields) for message, fields in reports}
    assert by_task["the-hog"][0] == "loop blocked"
    assert by_task["the-hog"][1]["cpu_ms"] >= 50
    assert "test_loopwatch.py" in by_task["the-hog"][1]["callback"]  # where the coroutine resumed and stopped
    # The sampled stack (the blocking code itself) is best effort: on this machine the sampler thread missed spins
    # of 80-200 ms right after it started (sampled_stack None), so it is not asserted here.
    assert by_task["the-sleeper"][0] == "loop slow"
    assert "unwatched" not in by_task


async def test_the_heartbeat_logs_when_the_loop_wakes_it_late(capsys: Any) -> None:
    beat = asyncio.create_task(heartbeat(interval_s=0.01, late_s=0.05))
    await asyncio.sleep(0.02)
    time.sleep(0.12)  # noqa: ASYNC251  # on purpose: the loop is held, the heartbeat wakes up late
    await asyncio.sleep(0.03)
    beat.cancel()
    captured = capsys.readouterr()
    assert "event loop late" in captured.out + captured.err
