"""LoadBalancer Services exposed over MQTT (issue 9 part 1), seen from outside: the real `lifecycle serve` on
the simulated node, Services made with kubectl, the retained `exposures` message and the events read with
mosquitto_sub, EXTERNAL-IP read with `kubectl get svc`."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

from test_install_over_mqtt import Node, _wait_state, make_node, payload

from lifecycle.exposures import parse_exposures

__all__ = ["make_node"]


def running_node(make_node: Callable[..., Node]) -> tuple[Node, Any]:
    node = make_node()
    node.start_service()
    events = node.subscribe("events")
    assert payload(node.request({"id": "up", "action": "install"}, correlation="up"))["ok"] is True
    last = _wait_state(events, "running", timeout_s=240)
    assert last["data"]["to"] == "running", node.log_path.read_text()[-3000:]
    return node, events


def exposures_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    body = payload(message)
    parse_exposures(json.dumps(body).encode())  # every message follows the contract
    return list(body["exposures"])


def node_ports(node: Node) -> dict[str, int]:
    """Service name -> its first node port, as kubectl shows them."""
    services = json.loads(node.kubectl("get", "svc", "-A", "-o", "json"))["items"]
    return {s["metadata"]["name"]: s["spec"]["ports"][0]["nodePort"] for s in services
            if s["spec"].get("type") == "LoadBalancer"}


def external_ip(node: Node, name: str) -> str:
    line = node.kubectl("get", "svc", name, "--no-headers").split()
    return line[3]  # NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S) AGE


def wait_external_ip(node: Node, name: str, wanted: str, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (shown := external_ip(node, name)) != wanted:
        assert time.monotonic() < deadline, f"EXTERNAL-IP of {name} is {shown!r}, not {wanted!r}"
        time.sleep(0.2)


def test_load_balancer_service_is_exposed_marked_conflicting_removed_and_cleared_on_reset(
    make_node: Callable[..., Node],
) -> None:
    node, events = running_node(make_node)
    exposures = node.subscribe("exposures")
    first = exposures.wait_for(lambda m: True, timeout_s=10)  # once running: the empty set
    assert exposures_of(first) == [] and payload(first)["host"] == "localhost"

    created_at = time.monotonic()
    node.kubectl("create", "service", "loadbalancer", "web", "--tcp=8080:80")
    listed = exposures.wait_for(lambda m: bool(payload(m)["exposures"]), timeout_s=5)
    took_s = time.monotonic() - created_at
    web_port = node_ports(node)["web"]
    assert exposures_of(listed) == [{
        "namespace": "default", "service": "web", "port": 8080, "protocol": "TCP",
        "node_ip": exposures_of(listed)[0]["node_ip"], "node_port": web_port, "conflict": None}]
    assert took_s < 2.0, f"the exposure took {took_s:.2f} s"
    assert payload(listed)["seq"] > payload(first)["seq"]
    wait_external_ip(node, "web", "localhost", timeout_s=2)

    # A second Service on the same port: both listed, both in conflict, neither forwarded nor shown as localhost.
    node.kubectl("create", "service", "loadbalancer", "web2", "--tcp=8080:81")
    both = exposures.wait_for(lambda m: len(payload(m)["exposures"]) == 2, timeout_s=5)
    entries = {e["service"]: e for e in exposures_of(both)}
    assert "default/web2" in entries["web"]["conflict"] and "default/web" in entries["web2"]["conflict"]
    assert entries["web2"]["node_port"] == node_ports(node)["web2"]
    wait_external_ip(node, "web", "<pending>", timeout_s=2)

    # Deleting one resolves the conflict of the other.
    node.kubectl("delete", "svc", "web")
    left = exposures.wait_for(lambda m: [e["service"] for e in payload(m)["exposures"]] == ["web2"], timeout_s=5)
    assert exposures_of(left)[0]["conflict"] is None
    wait_external_ip(node, "web2", "localhost", timeout_s=2)
    kinds = [(payload(m)["type"], payload(m)["data"].get("service"), payload(m)["data"].get("conflict"))
             for m in events.messages if payload(m)["type"].startswith("lifecycle.exposure.")]
    assert ("lifecycle.exposure.added", "web", None) in kinds
    assert any(k[0] == "lifecycle.exposure.conflict" and k[1] == "web" and k[2] for k in kinds)
    assert any(k[:2] == ("lifecycle.exposure.removed", "web") for k in kinds)
    assert ("lifecycle.exposure.conflict", "web2", None) in kinds  # resolved
    seqs = [payload(m)["seq"] for m in exposures.messages]
    assert seqs == sorted(set(seqs)), f"seq must grow with every message: {seqs}"

    # Reset: the retained message is deleted (an empty payload), with a removed event for what was exposed.
    assert payload(node.request({"id": "wipe", "action": "reset"}, correlation="wipe"))["ok"] is True
    assert _wait_state(events, "idle", timeout_s=120)["data"]["to"] == "idle"
    out = subprocess.run(["mosquitto_sub", "-V", "mqttv5", "-t", node.topic("exposures"), "-C", "1", "-W", "2"],
                         capture_output=True, text=True, check=False)
    assert out.stdout == "", f"retained exposures not cleared: {out.stdout!r}"
    assert any(payload(m)["type"] == "lifecycle.exposure.removed" and payload(m)["data"]["service"] == "web2"
               for m in events.messages)
