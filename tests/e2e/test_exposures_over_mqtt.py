"""LoadBalancer Services exposed over MQTT (issue 9 part 1), seen from outside: the real `lifecycle serve` on
the simulated node, Services made with kubectl, the retained `exposures` message and the events read with
mosquitto_sub, EXTERNAL-IP read with `kubectl get svc`."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from test_install_over_mqtt import LIFECYCLE, Node, make_node, payload

from lifecycle.exposures import parse_exposures

__all__ = ["make_node"]


def running_node(make_node: Callable[..., Node]) -> tuple[Node, Any]:
    node = make_node()
    return node, node.install_until_running("up", timeout_s=240)


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


class NodePortStandIn:
    """A TCP listener on a free port standing in for a Service's backend, the Service's only endpoint (an
    Endpoints object of its own: no pod needed): the simulated node's kube-proxy stand-in forwards the node port to
    it. It answers every connection with one line naming itself. Pods behind a node port: tests/faults."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"node port stand-in\n")

    def close(self) -> None:
        self.sock.close()


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        return conn.makefile("rb").readline()


def test_load_balancer_service_is_exposed_forwarded_marked_conflicting_and_removed(
    make_node: Callable[..., Node],
) -> None:
    node, events = running_node(make_node)
    exposures = node.subscribe("exposures")
    first = exposures.wait_for(lambda m: True, timeout_s=10)  # once running: the empty set
    assert exposures_of(first) == [] and payload(first)["host"] == "localhost"
    forward_log = node.log_path.with_name("forward.log")
    with open(forward_log, "wb") as out:
        forward = subprocess.Popen([str(LIFECYCLE), "forward", "--config", str(node.config_path), "--node", node.name],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        created_at = time.monotonic()
        node.kubectl("create", "service", "loadbalancer", "web", "--tcp=8080:80")
        listed = exposures.wait_for(lambda m: bool(payload(m)["exposures"]), timeout_s=5)
        took_s = time.monotonic() - created_at
        web_port = node_ports(node)["web"]
        assert exposures_of(listed) == [{
            "namespace": "default", "service": "web", "port": 8080, "protocol": "TCP", "node_ip": "127.0.0.1",
            "node_port": web_port, "conflict": None}]
        assert took_s < 2.0, f"the exposure took {took_s:.2f} s"
        assert payload(listed)["seq"] > payload(first)["seq"]
        wait_external_ip(node, "web", "localhost", timeout_s=2)

        # Through `lifecycle forward` and the node port to a listener standing in as the Service's endpoint (8080
        # may be taken on this shared machine: the forwarded Service gets a free port of its own).
        host_port = free_tcp_port()
        stand_in = NodePortStandIn()
        manifest = {"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "fwd"},  # no selector: its own Endpoints
             "spec": {"type": "LoadBalancer", "ports": [{"port": host_port, "targetPort": stand_in.port}]}},
            {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "fwd"},
             "subsets": [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"port": stand_in.port}]}]}]}
        subprocess.run(["kubectl", "--kubeconfig", str(node.root / "etc/kubernetes/admin.conf"), "apply", "-f", "-"],
                       input=json.dumps(manifest), text=True, capture_output=True, check=True, timeout=60)
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    assert ask(host_port) == b"node port stand-in\n"
                    break
                except OSError:
                    assert time.monotonic() < deadline, forward_log.read_text()
                    time.sleep(0.1)
        finally:
            stand_in.close()

        # A second Service on 8080: both listed, both in conflict, neither forwarded nor shown as localhost.
        node.kubectl("create", "service", "loadbalancer", "web2", "--tcp=8080:81")
        both = exposures.wait_for(lambda m: [e["port"] for e in payload(m)["exposures"]].count(8080) == 2,
                                  timeout_s=5)
        entries = {e["service"]: e for e in exposures_of(both)}
        assert "default/web2" in entries["web"]["conflict"] and "default/web" in entries["web2"]["conflict"]
        assert entries["web2"]["node_port"] == node_ports(node)["web2"]
        wait_external_ip(node, "web", "<pending>", timeout_s=2)

        # Deleting one resolves the conflict of the other.
        node.kubectl("delete", "svc", "web")
        left = exposures.wait_for(lambda m: {e["service"] for e in payload(m)["exposures"]} == {"web2", "fwd"},
                                  timeout_s=5)
        assert {e["service"]: e["conflict"] for e in exposures_of(left)} == {"web2": None, "fwd": None}
        wait_external_ip(node, "web2", "localhost", timeout_s=2)
    finally:
        forward.terminate()
        forward.wait(timeout=10)
    kinds = [(payload(m)["type"], payload(m)["data"].get("service"), payload(m)["data"].get("conflict"))
             for m in events.messages if payload(m)["type"].startswith("lifecycle.exposure.")]
    assert ("lifecycle.exposure.added", "web", None) in kinds
    assert any(k[0] == "lifecycle.exposure.conflict" and k[1] == "web" and k[2] for k in kinds)
    assert any(k[:2] == ("lifecycle.exposure.removed", "web") for k in kinds)
    assert ("lifecycle.exposure.conflict", "web2", None) in kinds  # resolved
    seqs = [payload(m)["seq"] for m in exposures.messages]
    assert seqs == sorted(set(seqs)), f"seq must grow with every message: {seqs}"
    assert f"forwarding to 127.0.0.1:{node_ports(node)['fwd']} for default/fwd" in forward_log.read_text()
