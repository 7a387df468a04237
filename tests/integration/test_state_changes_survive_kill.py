"""Issue 8, defect 5: no state change is lost at a SIGKILL. The service (a process of its own, test steps) is
killed right after a state change arrived and while the broker is down with state changes queued; a persistent
MQTT 5 subscriber must then see every `state_seq` once restarted, and tell dropped progress by a gap in `seq`.
Uses a private Mosquitto (free port, persistence on): the shared broker is never stopped."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lifecycle_fakes import eventually, journal, steer, write_config
from lifecycle_mqtt import PrivateBroker, Probe, ServiceProcess, probe, start_service_process, unique_prefix

from lifecycle.config import STEP_NAMES
from lifecycle.protocol import Topics

NODE = "kill9"
ALL_STATES = ["idle", *STEP_NAMES, "running"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    b = PrivateBroker(tmp_path, PrivateBroker.anonymous)
    b.start()
    yield b
    b.stop()


def _start(tmp_path: Path, broker: PrivateBroker, root: Path, prefix: str) -> ServiceProcess:
    config = write_config(tmp_path / "lifecycle.toml", root=root, node=NODE, prefix=prefix,
                          broker=f"mqtt://127.0.0.1:{broker.port}")
    root.mkdir(parents=True, exist_ok=True)
    return start_service_process(config, root=root, node=NODE, log_path=tmp_path / "service.log")


def _kill(svc: ServiceProcess) -> None:
    svc.proc.send_signal(signal.SIGKILL)
    svc.wait()


def _saved_state(root: Path) -> str:
    """state.json's state; `idle` before the first change wrote it (an install's reply comes before its job's
    first change: docs/protocol.md, replies)."""
    try:
        state: str = json.loads((root / "var/lib/lifecycle/state.json").read_text())["state"]
    except FileNotFoundError:
        return "idle"
    return state


def _changes(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each state change by its state_seq; a repeat (a re-publish after a crash) must be the same event."""
    by_state_seq: dict[int, dict[str, Any]] = {}
    for event in events:
        if event["type"] != "lifecycle.state.changed":
            continue
        first = by_state_seq.setdefault(event["data"]["state_seq"], event)
        assert first["id"] == event["id"] and first["data"] == event["data"], "a repeat is the same event"
    return by_state_seq


def _assert_every_change_arrived(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    changes = _changes(events)
    assert sorted(changes) == list(range(1, max(changes) + 1)), f"a state change is missing: {sorted(changes)}"
    walk = [changes[1]["data"]["from"]] + [changes[n]["data"]["to"] for n in sorted(changes)]
    assert walk[-1] == "running"
    for state in ALL_STATES:
        assert state in walk, f"no host heard of {state}: {walk}"
    return changes


async def _wait_running(p: Probe, root: Path) -> None:
    await p.wait_state("running", timeout_s=15)
    await eventually(lambda: _saved_state(root) == "running", timeout_s=5)


async def test_state_changes_queued_while_the_broker_is_down_survive_sigkill(
    tmp_path: Path, broker: PrivateBroker
) -> None:
    prefix, root = unique_prefix("kill9q"), tmp_path / "root"
    topics, session = Topics(prefix, NODE), f"kill9-watcher-{broker.port}"
    for name in STEP_NAMES:
        steer(root, name, run_s=0.05, progress=3)
    steer(root, "images", run_s=1.0, progress=3)
    steer(root, "kubeadm", block=True)
    svc = _start(tmp_path, broker, root, prefix)
    try:
        async with probe(topics, port=broker.port, session=session) as p:
            await p.ready(timeout_s=10)
            assert (await p.ask({"id": "i-1", "action": "install"}))["ok"]
            await p.wait_state("images", timeout_s=10)
        broker.stop()
        # The broker is down: images → binaries → kubeadm happen with nobody to publish to, then kill -9.
        await eventually(lambda: _saved_state(root) == "kubeadm" and "run kubeadm 1" in journal(root), timeout_s=10)
        _kill(svc)
        broker.start()
        steer(root, "kubeadm", run_s=0.05, progress=3)
        svc = _start(tmp_path, broker, root, prefix)
        async with probe(topics, port=broker.port, session=session) as p2:
            await _wait_running(p2, root)
            events = p.events() + p2.events()
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.wait() == 0
    finally:
        svc.proc.kill()
    changes = _assert_every_change_arrived(events)
    lost = set(range(1, max(e["data"]["seq"] for e in events) + 1)) - {e["data"]["seq"] for e in events}
    assert lost, "progress made while the broker was down died with the process"
    assert not lost & {c["data"]["seq"] for c in changes.values()}, "only progress is ever dropped"
    assert (root / "var/lib/lifecycle/outbox").stat().st_size == 0, "acknowledged events are trimmed"


async def test_sigkill_with_state_changes_queued_behind_progress_loses_none(
    tmp_path: Path, broker: PrivateBroker
) -> None:
    """A step that reports a burst of progress and ends at once: its state change waits behind the burst in the
    service (one QoS 1 publish at a time). Kill as soon as state.json moved on, three times, restart each time."""
    prefix, root = unique_prefix("kill9s"), tmp_path / "root"
    topics, session = Topics(prefix, NODE), f"kill9-watcher-{broker.port}"
    for name in STEP_NAMES:
        steer(root, name, run_s=0.3, progress=2)
    bursts = {"preflight": "certs", "images": "binaries", "kubeadm": "kubelet"}
    for name in bursts:
        steer(root, name, run_s=0.0, progress=1500)
    svc = _start(tmp_path, broker, root, prefix)
    try:
        async with probe(topics, port=broker.port, session=session) as p:
            await p.ready(timeout_s=10)
            assert (await p.ask({"id": "i-1", "action": "install"}))["ok"]
            for state in bursts.values():
                await eventually(lambda state=state: _saved_state(root) == state, timeout_s=15)
                _kill(svc)
                svc = _start(tmp_path, broker, root, prefix)
            await _wait_running(p, root)
            events = p.events()
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.wait() == 0
    finally:
        svc.proc.kill()
    _assert_every_change_arrived(events)
