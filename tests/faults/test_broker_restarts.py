"""The broker goes away during an install, from outside: the real `lifecycle serve` talks to a Mosquitto of the
test's own (persistence on), which the test stops, kills -9 and keeps down for a while at several points. The install
goes on without the broker (docs/architecture.md: events flow one way, never blocking the engine), a persistent
subscriber (clean start off, session expiry) sees every `lifecycle.state.changed` seq once the broker is back,
`availability` ends `online` (retained), and requests are answered again."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultlib import (
    INSTALL_CHAIN,
    Node,
    PrivateBroker,
    Subscriber,
    kubelets_under,
    make_node,
    payload,
    state_changes,
    state_seqs,
)
from test_install_over_mqtt import SIM_CONFIG

__all__ = ["make_node"]  # the fixture, used by name

OUTAGE_S = 10.0  # a partition-like outage: longer than the service's keepalive (simnode/lifecycle.toml: 10 s)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    private = PrivateBroker(tmp_path / "mosquitto")
    yield private
    private.close()


def _start(make_node: Callable[..., Node], broker: PrivateBroker) -> tuple[Node, Subscriber]:
    node = make_node(config_text=broker.use_in(SIM_CONFIG.read_text()))
    # Slower kubeadm phases: the install lasts long enough for every outage to fall inside it.
    node.write_faults({"delays_s": {"kubeadm_phase": 0.5}})
    broker.start_service(node)
    events = broker.subscribe(node, "events", client_id=f"fault-follower-{node.name}")
    reply = broker.request(node, {"id": "i1", "action": "install"}, correlation="c1")
    assert reply["ok"] is True, reply
    return node, events


def _entered(events: Subscriber, state: str, *, timeout_s: float = 180) -> None:
    events.wait_for(lambda m: payload(m).get("type") == "lifecycle.state.changed"
                    and payload(m)["data"]["to"] in (state, "failed"), timeout_s=timeout_s)
    assert state_changes(events)[-1]["to"] != "failed", state_changes(events)[-1]


def _ends_running_with_every_state_change(node: Node, broker: PrivateBroker, events: Subscriber) -> None:
    events.wait_for(lambda m: payload(m).get("type") == "lifecycle.state.changed"
                    and payload(m)["data"]["to"] in ("running", "failed"), timeout_s=240)
    assert state_changes(events)[-1]["to"] == "running", node.log_path.read_text()[-3000:]
    seqs = state_seqs(events)
    assert seqs == list(range(1, len(seqs) + 1)), f"state_seq gap for the persistent subscriber: {seqs}"
    assert [c["to"] for c in state_changes(events)] == INSTALL_CHAIN[1:]
    assert broker.retained(node, "availability", timeout_s=5) == "online"
    status = broker.request(node, {"id": "s1", "action": "status"}, correlation="s1")
    assert (status["ok"], status["state"]) == (True, "running"), status
    assert len(kubelets_under(node.root)) == 1


def test_broker_stopped_and_killed_during_install_then_back_loses_no_state_change(
    make_node: Callable[..., Node], broker: PrivateBroker
) -> None:
    node, events = _start(make_node, broker)
    _entered(events, "images")
    broker.stop()  # a clean restart (the broker saves its sessions)
    time.sleep(1)
    broker.start()
    _entered(events, "kubeadm")
    broker.kill()  # a crash: only what the broker autosaved survives
    time.sleep(2)
    broker.start()
    _entered(events, "readiness")
    broker.kill()
    broker.start()  # at once: the service may not even notice
    _ends_running_with_every_state_change(node, broker, events)


def test_broker_down_for_longer_than_the_keepalive_during_install_loses_no_state_change(
    make_node: Callable[..., Node], broker: PrivateBroker
) -> None:
    node, events = _start(make_node, broker)
    _entered(events, "kubeadm")
    broker.kill()
    down_at = time.monotonic()
    time.sleep(OUTAGE_S)  # the install goes on meanwhile: state changes wait in the service's outbox
    broker.start()
    _ends_running_with_every_state_change(node, broker, events)
    # Requests are answered once the broker is back, and quickly.
    asked_at = time.monotonic()
    status = broker.request(node, {"id": "s2", "action": "status"}, correlation="s2")
    assert status["ok"] is True and time.monotonic() - asked_at < 5
    print(f"outage {OUTAGE_S} s from {time.monotonic() - down_at:.0f} s before the end; state changes "
          f"{state_seqs(events)}")
