"""The real `lifecycle serve` on a simulated machine that lacks what kubeadm and the kubelet need (swap on, no
conntrack, ip_forward 0, the API port taken): one install request fails in `preflight` with every problem listed,
before anything is written; once the machine is fixed the next install gets past it."""

from __future__ import annotations

import socket
from collections.abc import Callable

from machine_view import break_prerequisites, tree
from test_install_over_mqtt import SIM_CONFIG, Node, _wait_state, make_node, payload  # noqa: F401 (a fixture)


def test_unmet_prerequisites_are_reported_together_before_anything_is_written(
    make_node: Callable[..., Node],  # noqa: F811 (the fixture imported above)
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = int(held.getsockname()[1])
        node = make_node(config_text=SIM_CONFIG.read_text().replace("api_port = 0 ", f"api_port = {port} ", 1))
        root = node.root
        broken = break_prerequisites(root)
        before = tree(root)
        node.start_service()
        events = node.subscribe("events")
        reply = node.request({"id": "req-pre-1", "action": "install"}, correlation="pre-1")
        assert payload(reply)["ok"] is True
        last = _wait_state(events, "running", timeout_s=60, request_id="req-pre-1")
        assert (last["data"]["to"], last["data"]["step"]) == ("failed", 1), last
        failed = next(payload(m)["data"] for m in events.messages if payload(m)["type"] == "lifecycle.step.failed")
        assert failed["state"] == "preflight" and failed["error"]["code"] == "prerequisites"
        checks = {c["check"]: c for c in failed["error"]["details"]["checks"]}
        assert set(checks) == {"Swap", "FileExisting-conntrack", "FileContent--proc-sys-net-ipv4-ip_forward",
                               f"Port-{port}"}, checks
        assert all(c["fix"] for c in checks.values())
        status = payload(node.retained("status", lambda m: payload(m)["state"] == "failed", timeout_s=10))
        assert status["error"]["code"] == "prerequisites" and status["step"] == 1
        assert tree(root) == before  # no certificate, kubeconfig, binary or hosts line
    # Fixed: swap off, forwarding on, conntrack back, the port free. The next install gets past preflight.
    broken.repair()
    assert payload(node.request({"id": "req-pre-2", "action": "install"}, correlation="pre-2"))["ok"] is True
    reached = _wait_state(events, "images", timeout_s=60, request_id="req-pre-2")
    assert reached["data"]["to"] == "images", reached
    assert (root / "etc/kubernetes/pki/ca.crt").is_file()
