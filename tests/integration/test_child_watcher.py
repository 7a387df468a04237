"""The service's child watcher (lifecycle.__main__): children that ended are forgotten, and the ones still running
when the service stops (the kubelet) are let go of, so that closing the loop does not warn of them."""

from __future__ import annotations

import asyncio
import os
import warnings

from lifecycle.__main__ import watch_children_by_pidfd


async def test_ended_children_are_forgotten_and_the_running_ones_let_go_of() -> None:
    previous = asyncio.get_child_watcher()
    watcher = watch_children_by_pidfd(asyncio.get_running_loop())
    assert watcher is not None, "this kernel has pidfd_open (Linux 5.3+)"
    lasting = None
    try:
        for _ in range(5):
            done = await asyncio.create_subprocess_exec("true")
            assert await done.wait() == 0
        lasting = await asyncio.create_subprocess_exec("sleep", "30", start_new_session=True)
        assert watcher.running == {lasting.pid}, "the five that ended are no longer held"
        watcher.let_go()
        assert watcher.running == frozenset()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "A loop is being detached ... with pending handlers" fails here
            watcher.attach_loop(None)
    finally:
        if lasting is not None:
            lasting.kill()
            await asyncio.to_thread(os.waitpid, lasting.pid, 0)  # let go of: reaped here, not by the watcher
        asyncio.set_child_watcher(previous)
