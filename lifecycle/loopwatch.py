"""Loop monitor: tells the operator when something holds the event loop (no event, reply or keepalive goes out
meanwhile).

Two parts, by cost:
- `heartbeat()`, always on: a task that sleeps `interval_s` and logs "event loop late" when it wakes up more than
  `late_s` after it asked to. It costs nothing (4 wake-ups a second) but cannot say which callback was at fault.
- `watch_callbacks()`, only when `LIFECYCLE_LOOP_BUDGET_MS` is set (tests, or an operator hunting a stall): every
  callback the loop runs is timed, and one over the budget is logged naming it: the task, the lines its coroutine
  resumed at and stopped at, the loop thread's stack sampled by a thread while the callback was over the budget
  (the blocking code itself), and the time spent in the garbage collector meanwhile. asyncio's own debug mode
  does the timing too, but also tracks the origin of every coroutine and task, which costs too much to leave on
  in production; this costs a few microseconds per callback and one thread waking every budget/2.

A callback over the budget is "loop blocked" when it spent more than the budget on the CPU (time.thread_time):
that is the callback's own fault (an import, key generation, YAML, hashing). When only its wall time is over the
budget it is "loop slow": on a loaded machine the OS may deschedule the loop thread for 50 ms or more, or the
GIL may be held by a worker thread, without the callback being at fault; the voluntary context switches
(getrusage) are logged with it so that a blocking system call (an fsync, a sleep) can still be told apart."""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lifecycle.logging import get_logger

LOOP_BUDGET_ENV = "LIFECYCLE_LOOP_BUDGET_MS"
HEARTBEAT_INTERVAL_S = 0.25
HEARTBEAT_LATE_S = 0.5  # late by this much: worth a line in any log (a keepalive or a reply waited that long)


async def heartbeat(*, interval_s: float = HEARTBEAT_INTERVAL_S, late_s: float = HEARTBEAT_LATE_S) -> None:
    """Log whenever the loop wakes this task up more than `late_s` late; until cancelled."""
    log = get_logger("lifecycle.loopwatch")
    loop = asyncio.get_running_loop()
    while True:
        due_s = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        late_by_s = loop.time() - due_s
        if late_by_s > late_s:
            log.warning("event loop late", late_ms=round(late_by_s * 1000))


def budget_from_environ() -> float | None:
    """The callback budget in seconds from `LIFECYCLE_LOOP_BUDGET_MS`; None when unset (or not a number)."""
    raw = os.environ.pop(LOOP_BUDGET_ENV, None)  # popped: child processes (kubelet, kubeadm) never see it
    if raw is None:
        return None
    try:
        budget_ms = float(raw)
    except ValueError:
        get_logger("lifecycle.loopwatch").warning("ignored: not a number of milliseconds", variable=LOOP_BUDGET_ENV,
                                                  value=raw)
        return None
    return budget_ms / 1000 if budget_ms > 0 else None


def _innermost(coro: Any) -> str | None:
    """Where a coroutine is suspended, following `await` down to the innermost coroutine of ours or a library's."""
    where = None
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        frame = coro.cr_frame
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        coro = getattr(coro, "cr_await", None)
    return where


def _task_of(handle: asyncio.Handle) -> asyncio.Task[Any] | None:
    task = getattr(getattr(handle, "_callback", None), "__self__", None)
    return task if isinstance(task, asyncio.Task) else None


def describe(handle: asyncio.Handle, *, started_at: str | None = None) -> str:
    """Name a callback: for a task step, the task's name, where its coroutine resumed (`started_at`, the start of
    the blocking code) and where it is suspended now (the first `await` after it)."""
    task = _task_of(handle)
    if task is not None:
        coro: Any = task.get_coro()
        now = _innermost(coro)
        if now is None:  # it returned in that callback: name the coroutine function instead
            code = getattr(coro, "cr_code", None)
            now = f"{code.co_filename}:{code.co_firstlineno} (returned)" if code is not None else "(returned)"
        span = f"from {started_at} to {now}" if started_at is not None else f"at {now}"
        return f"task {task.get_name()!r} {getattr(coro, '__qualname__', coro)!r} {span}"
    callback: Any = getattr(handle, "_callback", None)
    if callback is None:  # cancelled meanwhile (a timer): the handle's own description is all there is
        return repr(handle)
    return repr(getattr(callback, "__qualname__", None) or callback)


# Told of each callback over the budget: "loop blocked" or "loop slow", and the figures (see the module doc).
SlowCallbackReport = Callable[[str, dict[str, Any]], None]


def watch_callbacks(budget_s: float, *, report: SlowCallbackReport | None = None) -> Callable[[], None]:
    """Time every callback of every event loop in this process against `budget_s` (see the module doc); report
    the slow ones to `report` (default: a warning log line). Returns the function that stops the timing."""
    log = get_logger("lifecycle.loopwatch")
    original_run = asyncio.Handle._run

    def log_it(message: str, fields: dict[str, Any]) -> None:
        log.warning(message, **fields)

    tell = report or log_it
    gc_s = [0.0, 0.0]  # total seconds in the garbage collector, start of the current collection

    def gc_timer(phase: str, info: dict[str, Any]) -> None:  # a long collection is not the callback's own code
        if phase == "start":
            gc_s[1] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - gc_s[1]

    gc.callbacks.append(gc_timer)
    # A sampler thread: while a callback runs past the budget, where the loop thread is (its innermost frames),
    # taken once per slow callback; that names the blocking code itself, not only the awaits around it.
    running: dict[str, Any] = {"since_s": None, "thread": None, "stack": None}
    stopped = threading.Event()

    def sample() -> None:
        while not stopped.wait(budget_s / 2):
            since_s, thread_id = running["since_s"], running["thread"]
            if since_s is None or running["stack"] is not None or time.perf_counter() - since_s < budget_s:
                continue
            frame = sys._current_frames().get(thread_id)
            stack = traceback.extract_stack(frame, limit=None)[-6:] if frame is not None else []
            running["stack"] = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack))

    threading.Thread(target=sample, name="loopwatch-sampler", daemon=True).start()

    def timed_run(handle: asyncio.Handle) -> None:
        task = _task_of(handle)
        started_at = _innermost(task.get_coro()) if task is not None else None  # a few attribute reads
        wall_start_s, cpu_start_s, gc_start_s = time.perf_counter(), time.thread_time(), gc_s[0]
        running.update(since_s=wall_start_s, thread=threading.get_ident(), stack=None)
        voluntary_start = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
        original_run(handle)
        running["since_s"] = None
        wall_s = time.perf_counter() - wall_start_s
        if wall_s <= budget_s:
            return
        cpu_s = time.thread_time() - cpu_start_s
        switches = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - voluntary_start
        tell("loop blocked" if cpu_s > budget_s else "loop slow", {
            "callback": describe(handle, started_at=started_at), "wall_ms": round(wall_s * 1000, 1),
            "cpu_ms": round(cpu_s * 1000, 1), "gc_ms": round((gc_s[0] - gc_start_s) * 1000, 1),
            "voluntary_switches": switches, "sampled_stack": running["stack"], "budget_ms": round(budget_s * 1000)})

    def stop() -> None:
        stopped.set()
        gc.callbacks.remove(gc_timer)
        asyncio.Handle._run = original_run  # type: ignore[method-assign]

    asyncio.Handle._run = timed_run  # type: ignore[method-assign,assignment]
    return stop
