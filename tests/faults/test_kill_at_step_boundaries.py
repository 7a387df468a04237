"""SIGKILL of the real `lifecycle serve` the moment it announces each install state, then a restart: the install
resumes by itself (docs/protocol.md, "After a restart of the service") and ends `running` with one kubelet, at most
one process per static pod component, no container left in the engine and no `state_seq` missed by a subscriber
that stayed connected across the restart."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from faultlib import (
    INSTALL_CHAIN,
    Node,
    _wait_state,
    components_under,
    engine_leftovers,
    kubelets_under,
    make_node,
    payload,
    state_seqs,
    wait_until,
)

__all__ = ["make_node"]  # the fixture, used by name

KILL_STATES = INSTALL_CHAIN[1:-1]  # preflight ... addons


@pytest.mark.parametrize("state", KILL_STATES)
def test_sigkill_on_entering_a_state_then_restart_reaches_running_clean(
    make_node: Callable[..., Node], state: str
) -> None:
    node = make_node()
    node.start_service()
    events = node.subscribe("events")  # stays connected across the kill and the restart
    assert payload(node.request({"id": "i1", "action": "install"}, correlation="c1"))["ok"] is True

    entered = _wait_state(events, state, timeout_s=180)
    node.kill_service()  # at once: the state change into `state` is the last thing it published
    assert entered["data"]["to"] == state, node.log_path.read_text()[-3000:]

    node.start_service()
    last = _wait_state(events, "running", timeout_s=180)
    assert last["data"]["to"] == "running", node.log_path.read_text()[-3000:]

    seqs = state_seqs(events)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"state_seq gap or reorder: {seqs}"
    # Each state entered once: the restart resumes in the state it was in, with no new change into it.
    tos = [payload(m)["data"]["to"] for m in events.messages
           if payload(m).get("type") == "lifecycle.state.changed"]
    assert list(dict.fromkeys(tos)) == INSTALL_CHAIN[1:], tos

    # A SIGKILLed kubelet from before (there is none: the kubelet survives the service) would still show in /proc
    # for a moment; one kubelet must remain in the end.
    wait_until(lambda: len(kubelets_under(node.root)) == 1, timeout_s=10, what="not exactly one kubelet")
    components = components_under(node.root)
    assert {"kube-apiserver", "etcd"} <= components.keys(), components
    assert all(len(pids) == 1 for pids in components.values()), components
    assert engine_leftovers(node.name) == []
    assert " Ready " in node.kubectl("get", "nodes", node.name)
