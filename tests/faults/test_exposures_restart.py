"""Exposures (issue 9 part 1) through faults, from outside: the service SIGKILLed while Services change, the API
server killed under the watch, many changes in a row. After each, the retained `exposures` message must equal
what `kubectl get svc` says, and the service's descriptors must not grow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from faultlib import Node, _wait_state, components_under, make_node, payload, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_exposures_over_mqtt import exposures_of, running_node

__all__ = ["make_node"]  # the fixture, used by name


def kubectl_view(node: Node) -> set[tuple[str, str, int, str, int]]:
    """Every LoadBalancer port as `kubectl get svc -A` has it: (namespace, name, port, protocol, nodePort)."""
    items = json.loads(node.kubectl("get", "svc", "-A", "-o", "json"))["items"]
    return {(s["metadata"]["namespace"], s["metadata"]["name"], p["port"], p.get("protocol", "TCP"), p["nodePort"])
            for s in items if s["spec"].get("type") == "LoadBalancer" for p in s["spec"]["ports"]}


def published_view(message: dict[str, Any]) -> set[tuple[str, str, int, str, int]]:
    return {(e["namespace"], e["service"], e["port"], e["protocol"], e["node_port"]) for e in exposures_of(message)}


def wait_published_equals_kubectl(node: Node, *, timeout_s: float) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def same() -> bool:
        found["message"] = node.retained("exposures", lambda m: True, timeout_s=5)
        return published_view(found["message"]) == kubectl_view(node)

    wait_until(same, timeout_s=timeout_s, what="retained exposures equal to kubectl get svc")
    return payload(found["message"])


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_exposures_follow_kubectl_across_a_sigkill_an_apiserver_kill_and_many_changes(
    make_node: Callable[..., Node],
) -> None:
    node, events = running_node(make_node)
    node.kubectl("create", "service", "loadbalancer", "web", "--tcp=8080:80")
    node.kubectl("create", "service", "loadbalancer", "db", "--tcp=5432:5432")
    before = wait_published_equals_kubectl(node, timeout_s=5)
    assert len(before["exposures"]) == 2

    # SIGKILL; while the service is down: one deleted, one created, one changed (a new node port).
    node.kill_service()
    node.kubectl("delete", "svc", "web")
    node.kubectl("create", "namespace", "apps")
    node.kubectl("create", "service", "loadbalancer", "api", "-n", "apps", "--tcp=9090:90")
    node.kubectl("patch", "svc", "db", "--type=json", "-p",
                 '[{"op": "replace", "path": "/spec/ports/0/nodePort", "value": 30543}]')
    node.start_service()
    after = wait_published_equals_kubectl(node, timeout_s=10)
    assert after["seq"] > before["seq"], (before["seq"], after["seq"])
    assert {e["service"] for e in after["exposures"]} == {"api", "db"}
    assert before_port(after, "db") == 30543
    assert node.kubectl("get", "svc", "api", "-n", "apps", "--no-headers").split()[3] == "localhost"
    seen = {(payload(m)["type"].rsplit(".", 1)[1], payload(m)["data"]["service"], payload(m)["data"]["node_port"])
            for m in events.messages if payload(m)["type"].startswith("lifecycle.exposure.")}
    assert {("removed", "web", before_port(before, "web")), ("added", "db", 30543)} <= seen, seen
    assert any(kind == "added" and name == "api" for kind, name, _ in seen), seen

    # The API server killed under the watch (the kubelet restarts it): the watch is lost, the service lists again.
    apiserver = components_under(node.root).get("kube-apiserver") or []
    assert apiserver, "no kube-apiserver process"
    for pid in apiserver:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _answers(node), timeout_s=60, what="the API server back")
    node.kubectl("create", "service", "loadbalancer", "late", "--tcp=7070:70")
    wait_published_equals_kubectl(node, timeout_s=20)

    # Many changes in a row: the last message is right and the descriptors do not grow.
    assert node.service is not None
    pid = node.service.pid
    counts = []
    for round_ in range(3):
        for i in range(8):
            node.kubectl("create", "service", "loadbalancer", f"burst-{i}", f"--tcp={6000 + i}:80")
        wait_published_equals_kubectl(node, timeout_s=10)
        node.kubectl("delete", "svc", *(f"burst-{i}" for i in range(8)))
        wait_published_equals_kubectl(node, timeout_s=10)
        time.sleep(1)
        counts.append(fds(pid))
        print(f"round {round_}: {counts[-1]} fds")
    assert counts[-1] <= counts[0], f"descriptors grew: {counts}"

    # Reset: the retained message is deleted (an empty payload), with a removed event for what was exposed.
    assert payload(node.request({"id": "wipe", "action": "reset"}, correlation="wipe"))["ok"] is True
    assert _wait_state(events, "idle", timeout_s=120)["data"]["to"] == "idle"
    out = subprocess.run(["mosquitto_sub", "-V", "mqttv5", "-t", node.topic("exposures"), "-C", "1", "-W", "2"],
                         capture_output=True, text=True, check=False)
    assert out.stdout == "", f"retained exposures not cleared: {out.stdout!r}"
    assert any(payload(m)["type"] == "lifecycle.exposure.removed" and payload(m)["data"]["service"] == "late"
               for m in events.messages)


def before_port(message: dict[str, Any], service: str) -> int:
    return next(e["node_port"] for e in message["exposures"] if e["service"] == service)


def _answers(node: Node) -> bool:
    try:
        node.kubectl("get", "--raw", "/readyz")
    except Exception:
        return False
    return True
