"""A step cancelled while its thread writes files waits for the thread before the cancellation goes on: a reset
that pre-empted the certs step met the step's temp files renamed away under its rmtree (found by
tests/faults/test_conflicting_requests.py: reset at preflight/certs ended `failed` with FileNotFoundError)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from lifecycle.step import finish_in_thread


async def test_a_cancelled_caller_resumes_only_after_the_thread_finished() -> None:
    done = threading.Event()

    def write() -> str:
        time.sleep(0.3)
        done.set()
        return "written"

    task = asyncio.create_task(finish_in_thread(write))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done.is_set(), "the cancellation went on while the thread still wrote"
    assert await finish_in_thread(write) == "written"
