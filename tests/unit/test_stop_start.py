"""Stop and start (issue 10 part 2) with the engine fakes: the state graph, the replies of docs/protocol.md
Outcomes for stop/start in every state and for every request in `stopped`, and a restart in `stopped`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lifecycle_fakes import (
    drain_events,
    eventually,
    fake_plan,
    fake_reset,
    fake_stop_node,
    journal,
    make_config,
    null_ports,
    steer,
)

from lifecycle.bus import Bus, Subscription
from lifecycle.engine import Engine
from lifecycle.errors import RequestError
from lifecycle.machine import State, StateMachine, mermaid
from lifecycle.paths import HostPaths
from lifecycle.protocol import STOPPED_MESSAGE, Event, EventType
from lifecycle.service import state_file


def make_engine(root: Path) -> tuple[Engine, Subscription]:
    bus = Bus()
    sub = bus.subscribe("test")
    engine = Engine(config=make_config(root), paths=HostPaths(root), ports=null_ports(), plan=fake_plan(),
                    reset=fake_reset, store=state_file(HostPaths(root)), bus=bus, stop_node=fake_stop_node)
    return engine, sub


def states(events: list[Event]) -> list[str]:
    return [e.data["to"] for e in events if e.type == EventType.STATE_CHANGED]


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Engine, Subscription]]:
    engine, sub = make_engine(tmp_path)
    await engine.install(request_id="i1", version=None)
    await engine.wait_job()
    assert engine.state == State.RUNNING
    drain_events(sub)
    yield engine, sub
    await engine.shutdown()


async def refused(code: str, request: object) -> None:
    with pytest.raises(RequestError) as info:
        await request  # type: ignore[misc]
    assert info.value.code == code, info.value.message


def test_graph_has_stop_and_start() -> None:
    machine = StateMachine(State.RUNNING)
    machine.move(State.STOPPED)
    for dest in (State.IMAGES, State.BINARIES, State.KUBEADM, State.RUNNING, State.IDLE):
        assert not machine.allows(dest), dest  # a start never walks the install from its beginning
    assert machine.allows(State.RESETTING) and machine.allows(State.FAILED)
    machine.move(State.KUBELET)
    assert not StateMachine(State.IDLE).allows(State.STOPPED)
    assert "running --> stopped: stop" in mermaid() and "stopped --> kubelet: start" in mermaid()


async def test_stop_then_start_skips_images_binaries_kubeadm(running: tuple[Engine, Subscription]) -> None:
    engine, sub = running
    accepted = await engine.stop(request_id="s1")
    assert (accepted.note, engine.state) == ("stop started", State.STOPPED)
    await engine.wait_job()
    events = drain_events(sub)
    assert states(events) == ["stopped"]
    assert any(e.type == EventType.STEP_PROGRESS and e.data["message"] == STOPPED_MESSAGE for e in events)
    assert (await engine.stop(request_id="s2")).note == "already stopped"

    before = len(journal(engine.paths.root))
    accepted = await engine.start_cluster(request_id="g1")
    assert accepted.note == "start started"
    await engine.wait_job()
    assert engine.state == State.RUNNING
    assert states(drain_events(sub)) == ["kubelet", "readiness", "addons", "running"]
    assert journal(engine.paths.root)[before:] == ["run kubelet 2", "run readiness 2"]  # addons: already done
    assert (await engine.start_cluster(request_id="g2")).note == "already running"


async def test_replies_in_stopped(running: tuple[Engine, Subscription]) -> None:
    engine, sub = running
    await engine.stop(request_id="s1")
    await engine.wait_job()
    await refused("stopped", engine.install(request_id="i2", version=None))
    assert (await engine.cancel(request_id="c1")).note == "nothing to cancel"
    assert engine.state == State.STOPPED
    await engine.reset(request_id="r1")
    await engine.wait_job()
    assert engine.state == State.IDLE
    assert states(drain_events(sub))[-2:] == ["resetting", "idle"]


async def test_replies_while_stopping(running: tuple[Engine, Subscription]) -> None:
    engine, _ = running
    steer(engine.paths.root, "stop", run_s=0.5)
    await engine.stop(request_id="s1")
    assert (await engine.stop(request_id="s2")).request_id == "s1"
    await refused("busy", engine.start_cluster(request_id="g1"))
    await refused("busy", engine.install(request_id="i1", version=None))
    await refused("not_cancellable", engine.cancel(request_id="c1"))
    await engine.reset(request_id="r1")  # a reset interrupts a stop
    await engine.wait_job()
    assert engine.state == State.IDLE


async def test_stop_and_start_refused_elsewhere(tmp_path: Path) -> None:
    engine, _ = make_engine(tmp_path)
    try:
        await refused("not_installed", engine.stop(request_id="s1"))
        await refused("not_stopped", engine.start_cluster(request_id="g1"))
        steer(tmp_path, "kubeadm", fail="permanent")
        await engine.install(request_id="i1", version=None)
        await engine.wait_job()
        assert engine.state == State.FAILED
        await refused("busy", engine.stop(request_id="s2"))
        await refused("not_stopped", engine.start_cluster(request_id="g2"))
        steer(tmp_path, "kubeadm", block=True)
        await engine.install(request_id="i2", version=None)
        await eventually(lambda: engine.state == State.KUBEADM)
        await refused("busy", engine.stop(request_id="s3"))
        await refused("busy", engine.start_cluster(request_id="g3"))
    finally:
        await engine.shutdown()


async def test_failed_stop_is_failed(running: tuple[Engine, Subscription]) -> None:
    engine, sub = running
    steer(engine.paths.root, "stop", fail="permanent")
    await engine.stop(request_id="s1")
    await engine.wait_job()
    assert engine.state == State.FAILED
    assert engine.status().error is not None and engine.status().error.code == "fake_stop_failed"
    assert states(drain_events(sub)) == ["stopped", "failed"]


async def test_restart_in_stopped_stays_stopped(tmp_path: Path) -> None:
    engine, _ = make_engine(tmp_path)
    await engine.install(request_id="i1", version=None)
    await engine.wait_job()
    await engine.stop(request_id="s1")
    await engine.wait_job()
    await engine.shutdown()
    runs_before = [line for line in journal(tmp_path) if line.startswith("run ")]

    again, sub = make_engine(tmp_path)  # the service restarted
    try:
        await again.start()
        await again.wait_job()
        assert again.state == State.STOPPED
        events = drain_events(sub)
        assert states(events) == []  # no re-check that would start the kubelet
        assert [line for line in journal(tmp_path) if line.startswith("run ")] == runs_before
        assert journal(tmp_path)[-1] == "stop"  # the stop was made again (a kill may have cut it short)
        assert (await again.start_cluster(request_id="g1")).note == "start started"
        await again.wait_job()
        assert again.state == State.RUNNING
    finally:
        await again.shutdown()
