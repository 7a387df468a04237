"""The durable outbox (issue 8, defect 5): what it hands back after a crash, when it empties, and the bus that
never drops a state change to make room."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest
from lifecycle_fakes import drain_events, eventually, fake_plan, fake_reset, make_config, null_ports

from lifecycle.bus import Bus, BusItem
from lifecycle.engine import Engine
from lifecycle.outbox import Outbox
from lifecycle.paths import HostPaths
from lifecycle.protocol import Event, EventType
from lifecycle.service import state_file
from lifecycle.store import Snapshot


def _change(seq: int, state_seq: int) -> Event:
    return Event(type=EventType.STATE_CHANGED, seq=seq, data={"seq": seq, "state_seq": state_seq, "to": "images"})


def test_a_restart_gets_back_every_unacknowledged_event_unchanged_and_skips_a_torn_line(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    assert box.open() == []
    first, second, third = _change(3, 1), _change(7, 2), _change(9, 3)
    for event in (first, second, third):
        box.append(event)
    box.acknowledged(3)
    box.close()
    with open(box.path, "ab") as f:
        f.write(b'{"type": "lifecycle.state.changed", "seq": 10, "da')  # a kill in the middle of a write

    again = Outbox(tmp_path)
    assert again.open() == [second, third], "same id, seq and data: a subscriber can tell a repeat"
    assert (again.last_seq, again.last_state_seq) == (9, 3)
    again.close()


def test_the_file_empties_once_the_broker_acknowledged_everything(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.open()
    box.append(_change(1, 1))
    box.append(_change(2, 2))
    box.acknowledged(1)
    assert box.path.stat().st_size > 0
    box.acknowledged(2)
    assert box.path.stat().st_size == 0
    box.close()
    assert Outbox(tmp_path).open() == []


async def test_the_outbox_empties_only_once_the_state_file_caught_up(tmp_path: Path) -> None:
    """state.json is saved in the outbox's thread: an acknowledged change stays in the outbox until then, so a kill
    before the save still finds its numbers there (issue 11: the save left the event loop)."""
    disk = threading.Event()  # the state file's save finishes when the test says so
    saved: list[str] = []

    def slow_save() -> None:
        disk.wait(5)
        saved.append(threading.current_thread().name)

    box = Outbox(tmp_path)
    box.open()
    box.append(_change(1, 1))
    box.checkpoint(slow_save)
    box.acknowledged(1)  # the broker has it, state.json does not yet
    await asyncio.sleep(0.05)
    assert box.path.stat().st_size > 0, "emptied before state.json had the change"
    disk.set()
    async with asyncio.timeout(5):
        await box.checkpoints_done()
    await eventually(lambda: box.path.stat().st_size == 0, timeout_s=5)  # emptied in the outbox's thread
    assert saved and saved[0].startswith("lifecycle-outbox-fsync"), "saved in the outbox's thread, not the loop's"
    box.close()


async def test_an_install_with_the_outbox_never_fsyncs_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every fsync of a state change (the outbox line, state.json and its directory) runs off the loop: on this
    machine one took 1-40 ms while image layers were written (issue 11)."""
    on_loop: list[str] = []
    real_fsync = os.fsync
    loop_thread = threading.current_thread()

    def watched_fsync(fd: int) -> None:
        if threading.current_thread() is loop_thread:
            on_loop.append(str(Path(f"/proc/self/fd/{fd}").readlink()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watched_fsync)
    paths = HostPaths(tmp_path)
    bus, box = Bus(), Outbox(paths.state_dir)
    box.open()
    engine = Engine(config=make_config(tmp_path), paths=paths, ports=null_ports(), plan=fake_plan(),
                    reset=fake_reset, store=state_file(paths), bus=bus, outbox=box)
    await engine.start()
    await engine.install(request_id="r1", version=None)
    await engine.wait_job()
    assert engine.status().state == "running"
    assert json.loads((paths.state_dir / "state.json").read_text())["state"] == "running", "saved by wait_job"
    assert on_loop == []
    box.close()


def test_a_full_bus_buffer_drops_progress_never_a_state_change() -> None:
    bus = Bus()
    sub = bus.subscribe("mqtt", max_items=3)
    bus.publish(_change(1, 1))
    for seq in range(2, 12):
        bus.publish(Event(type=EventType.STEP_PROGRESS, seq=seq, data={"seq": seq}))
    bus.publish(_change(12, 2))
    kept = []
    while len(sub):
        kept.append(sub.pop())
    assert [e.seq for e in kept if isinstance(e, Event)] == [1, 11, 12]
    assert sub.dropped == 9


async def test_state_seq_counts_state_changes_across_restarts_and_a_change_only_in_the_outbox(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    changes: list[Event] = []
    for request in ("r1", "z1"):
        bus, box = Bus(), Outbox(paths.state_dir)
        sub = bus.subscribe("test")
        box.open()
        engine = Engine(config=make_config(tmp_path), paths=paths, ports=null_ports(), plan=fake_plan(),
                        reset=fake_reset, store=state_file(paths), bus=bus, outbox=box)
        await engine.start()
        if request.startswith("r"):
            await engine.install(request_id=request, version=None)
        else:
            await engine.reset(request_id=request)
        await engine.wait_job()
        box.close()
        changes += [item for item in drain_events(sub) if item.type == EventType.STATE_CHANGED]
    assert [c.data["state_seq"] for c in changes] == list(range(1, len(changes) + 1))
    assert json.loads((paths.state_dir / "state.json").read_text())["state_seq"] == len(changes)

    # A kill after the outbox append, before state.json: the next start hands out neither number again.
    ghost = Outbox(paths.state_dir)
    ghost.open()
    ghost.append(Event(type=EventType.STATE_CHANGED, seq=500, data={"seq": 500, "state_seq": 90}))
    ghost.close()
    box = Outbox(paths.state_dir)
    assert [e.seq for e in box.open()][-1] == 500  # nothing was acknowledged: no broker here
    engine = Engine(config=make_config(tmp_path), paths=paths, ports=null_ports(), plan=fake_plan(),
                    reset=fake_reset, store=state_file(paths), bus=Bus(), outbox=box)
    assert engine.status().seq == 500
    box.close()


async def test_every_state_change_is_in_the_outbox_when_published_and_in_state_json_before_the_next_callback(
    tmp_path: Path,
) -> None:
    """A kill right after a host heard of a change must find it: in the outbox when it is published (the restart
    publishes it again and makes it again, docs/protocol.md), and in state.json before the loop runs anything else
    (no PUBACK can empty the outbox ahead of it). A boot after a reboot resumed `addons` after `running` was
    announced and ended `failed` when state.json was replaced later, from a thread (tests/faults/
    test_boot_offline.py). The publish comes before the replace: the replace cost every change ~1 ms, up to 10 ms
    on a busy disk (bench_event_latency)."""
    paths = HostPaths(tmp_path)
    in_outbox: list[bool] = []
    in_state_file_next: list[tuple[int, int]] = []  # (the change's state_seq, state.json's at the next callback)
    loop = asyncio.get_running_loop()

    def state_file_now(state_seq: int) -> None:
        saved = json.loads((paths.state_dir / "state.json").read_text())
        in_state_file_next.append((state_seq, saved["state_seq"]))

    class CheckingBus(Bus):
        def publish(self, item: BusItem) -> None:
            if isinstance(item, Event) and item.type == EventType.STATE_CHANGED:
                lines = (paths.state_dir / "outbox").read_text().splitlines()
                in_outbox.append(any(json.loads(line)["seq"] == item.seq for line in lines))
                loop.call_soon(state_file_now, item.data["state_seq"])  # the loop's next callback at the earliest
            super().publish(item)

    box = Outbox(paths.state_dir)
    box.open()
    engine = Engine(config=make_config(tmp_path), paths=paths, ports=null_ports(), plan=fake_plan(),
                    reset=fake_reset, store=state_file(paths), bus=CheckingBus(), outbox=box)
    await engine.start()
    await engine.install(request_id="r1", version=None)
    await engine.wait_job()
    box.close()
    assert in_outbox and all(in_outbox), in_outbox
    assert len(in_state_file_next) == len(in_outbox)
    assert all(saved >= state_seq for state_seq, saved in in_state_file_next), in_state_file_next


def test_a_restart_takes_the_outbox_state_when_state_json_is_one_change_behind(tmp_path: Path) -> None:
    """A kill between a state change's publish and the replace of state.json (one callback) leaves the file one
    change behind the outbox: the restart takes the outbox's record of the file (the hosts may have heard of that
    change) and writes it to state.json, instead of making the change again (tests/faults/
    test_kill_inside_steps.py: `certs` entered twice after a kill right after a host heard of it)."""
    paths = HostPaths(tmp_path)
    store = state_file(paths)
    before = Snapshot(state="addons", since=1.0, seq=41, state_seq=9, request_id="r1", step=9)
    store.save(before)
    after = Snapshot(state="running", since=2.0, seq=42, state_seq=10, request_id="r1")
    _append_change(paths, after, came_from="addons")  # killed: state.json never replaced
    engine = _restarted_engine(tmp_path, paths)
    assert engine.state.value == "running"
    assert (engine.status().seq, engine.status().state_seq) == (42, 10)
    saved = json.loads((paths.state_dir / "state.json").read_text())
    assert (saved["state"], saved["state_seq"], saved["since"]) == ("running", 10, 2.0)


def test_an_outbox_state_older_than_state_json_is_not_taken(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    store = state_file(paths)
    _append_change(paths, Snapshot(state="addons", since=1.0, seq=41, state_seq=9), came_from="readiness")
    store.save(Snapshot(state="running", since=2.0, seq=42, state_seq=10))  # replaced after the append
    assert _restarted_engine(tmp_path, paths).state.value == "running"


def test_the_outbox_offers_no_state_when_its_newest_change_holds_none(tmp_path: Path) -> None:
    """A change appended by a version that wrote no state into its records: the record before it is not the
    newest state, so none is offered (the engine keeps state.json's)."""
    paths = HostPaths(tmp_path)
    _append_change(paths, Snapshot(state="addons", since=1.0, seq=41, state_seq=9), came_from="readiness")
    box = Outbox(paths.state_dir)
    box.open()
    box.append(_change(42, 10))
    box.close()
    again = Outbox(paths.state_dir)
    again.open()
    assert (again.last_state_seq, again.last_snapshot) == (10, None)
    again.close()


def _append_change(paths: HostPaths, snap: Snapshot, *, came_from: str) -> None:
    """The outbox record of the change into `snap` (as `Engine._transition` appends it), then the process ends."""
    box = Outbox(paths.state_dir)
    box.open()
    data = {"seq": snap.seq, "state_seq": snap.state_seq, "from": came_from, "to": snap.state}
    box.append(Event(type=EventType.STATE_CHANGED, seq=snap.seq, data=data), snapshot=snap.to_json())
    box.close()


def _restarted_engine(tmp_path: Path, paths: HostPaths) -> Engine:
    box = Outbox(paths.state_dir)
    box.open()
    engine = Engine(config=make_config(tmp_path), paths=paths, ports=null_ports(), plan=fake_plan(),
                    reset=fake_reset, store=state_file(paths), bus=Bus(), outbox=box)
    box.close()
    return engine
