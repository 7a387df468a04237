"""Stop and start across a SIGKILL of the service (issue 10 part 2): killed right after it accepted a `stop`
(state `stopped` saved, the stop possibly cut short, the kubelet and static pods surviving the kill), a restart
stays `stopped` and ends what still runs instead of re-checking (which would start the kubelet); a `start`
then brings the cluster back with its objects."""

from __future__ import annotations

from collections.abc import Callable

from faultlib import Node, _wait_state, components_under, kubelets_under, make_node, payload, wait_until

__all__ = ["make_node"]  # the fixture, used by name


def test_kill_after_stop_then_restart_stays_stopped_with_nothing_running(make_node: Callable[..., Node]) -> None:
    node = make_node()
    events = node.install_until_running("install-1")
    node.kubectl("create", "configmap", "kept", "--from-literal=answer=42")

    reply = payload(node.request({"id": "stop-1", "action": "stop"}, correlation="c-stop"))
    assert (reply["ok"], reply["state"]) == (True, "stopped"), reply
    node.kill_service()  # at once: the kubelet (left running on purpose by a service that exits) may survive
    node.start_service()
    wait_until(lambda: not kubelets_under(node.root) and not components_under(node.root), timeout_s=30,
               what="the restart in stopped ended the kubelet and static pods")
    status = payload(node.retained("status", lambda m: payload(m)["state"] == "stopped", timeout_s=10))
    assert status["state"] == "stopped"
    assert not kubelets_under(node.root), "a restart in stopped started the kubelet"

    assert payload(node.request({"id": "start-1", "action": "start"}, correlation="c-start"))["ok"] is True
    assert _wait_state(events, "running", timeout_s=60, request_id="start-1")["data"]["to"] == "running"
    assert "answer" in node.kubectl("get", "configmap", "kept", "-o", "jsonpath={.data}")
    assert len(kubelets_under(node.root)) == 1
