"""A configuration change on a running cluster, on the simulated node through the real service over MQTT: the
service is stopped, one key of its config file changed, and it is started again. A ConfigMap made before the
change must survive every case: what can be applied live is (SANs visible with `openssl s_client`, the kubelet
restarted on its new healthz port), the rest is refused with `reset_required` naming the keys, in the status
and as the error of an `install`, while the cluster keeps running on its installed settings.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import faultlib  # noqa: F401 (puts tests/e2e on sys.path first)
import test_install_over_mqtt as install_e2e
import yaml
from conftest import free_port
from test_cert_renewal import _api_server, _events_of
from test_install_over_mqtt import LIFECYCLE, Node, _wait_state, payload

make_node = install_e2e.make_node  # the fixture: a service of its own on a fresh root, killed in teardown

EXTRA_SANS = ["api.drift.test", "10.11.12.13"]


def _with(text: str, **keys: str) -> str:
    """The config text with `[kubernetes]` keys set (replaced where present, else added under the table)."""
    lines = text.splitlines()
    for key, value in keys.items():
        at = next((i for i, line in enumerate(lines) if line.startswith(f"{key} =")), None)
        if at is None:
            at = lines.index("[kubernetes]") + 1
            lines.insert(at, f"{key} = {value}")
        else:
            lines[at] = f"{key} = {value}"
    return "\n".join(lines) + "\n"


def _install(node: Node, request_id: str) -> Any:
    node.start_service()
    events = node.subscribe("events")
    assert payload(node.request({"id": request_id, "action": "install"}, correlation=request_id))["ok"] is True
    last = _wait_state(events, "running", timeout_s=120, request_id=request_id)
    assert last["data"]["to"] == "running", node.log_path.read_text()[-3000:]
    node.kubectl("create", "configmap", "made-before", "--from-literal=keep=me")
    return events


def _restart_with(node: Node, text: str) -> None:
    """Stop the service (SIGTERM: a clean stop, the kubelet keeps running), change the config file, start it."""
    assert node.service is not None
    node.service.terminate()
    node.service.wait(timeout=30)
    node.config_path.write_text(text)
    node.start_service()


def _settled(node: Node, events: Any, *, since_seq: int) -> dict[str, Any]:
    """After a restart that has something to apply: the re-check's last state change (to running or failed; it
    goes running -> certs -> ... -> running), then the retained status that followed it."""
    last = payload(events.wait_for(
        lambda m: payload(m)["type"] == "lifecycle.state.changed" and payload(m)["data"]["seq"] > since_seq
        and payload(m)["data"]["to"] in ("running", "failed"),
        timeout_s=60))  # ~6 s measured (renewal included) on a loaded 2-core machine
    assert last["data"]["to"] == "running", (last, node.log_path.read_text()[-4000:])
    return payload(node.retained("status", lambda m: payload(m)["seq"] >= last["data"]["seq"], timeout_s=10))


def _seq_now(node: Node) -> int:
    """The sequence number of the retained status: every event so far is at or below it."""
    return int(payload(node.retained("status", lambda m: True, timeout_s=10))["seq"])


def _configmap_kept(node: Node) -> None:
    data = json.loads(node.kubectl("get", "configmap", "made-before", "-o", "json"))["data"]
    assert data == {"keep": "me"}


def _served_sans(node: Node) -> set[str]:
    """The API server's certificate as `openssl s_client` sees it (verified by the node's CA): its SANs."""
    ca = node.root / "etc/kubernetes/pki/ca.crt"
    out = subprocess.run(
        ["openssl", "s_client", "-connect", _api_server(node), "-CAfile", str(ca), "-servername", "localhost",
         "-verify_return_error"],
        input="", capture_output=True, text=True, timeout=20, check=False)
    assert out.returncode == 0 and "Verify return code: 0 (ok)" in out.stdout, out.stdout[-2000:] + out.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=out.stdout,
                          capture_output=True, text=True, check=True).stdout
    names = text.split("\n", 1)[1].strip()
    return {entry.strip().split(":", 1)[1] for entry in names.split(",")}


def _healthz(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as answer:
            return f"{answer.status}"
    except urllib.error.URLError as exc:
        return f"error: {exc.reason}"
    except OSError as exc:
        return f"error: {exc}"


def _kubelet_pid(node: Node) -> int:
    return int(json.loads((node.root / "var/lib/lifecycle/kubelet.pid").read_text())["pid"])


def test_sans_and_kubelet_healthz_port_changed_on_a_running_cluster_are_applied_and_keep_its_objects(
    make_node: Callable[..., Node],
) -> None:
    node = make_node()
    events = _install(node, "inst-live")
    assert not set(EXTRA_SANS) & _served_sans(node)

    # extra_sans: the renewal routine issues the API server certificate with them; nothing is reset.
    seq = _seq_now(node)
    _restart_with(node, _with(node.config_path.read_text(), extra_sans=json.dumps(EXTRA_SANS)))
    status = _settled(node, events, since_seq=seq)
    assert status["config_drift"] == [], status
    assert set(EXTRA_SANS) <= _served_sans(node)
    _configmap_kept(node)
    after = [e for e in _events_of(events.messages, "lifecycle.state.changed") if e["seq"] > seq]
    assert "failed" not in {e["to"] for e in after}, after
    assert [e for e in _events_of(events.messages, "lifecycle.certs.renewed") if e["seq"] > seq]
    progress = [e["message"] for e in _events_of(events.messages, "lifecycle.step.progress") if e["seq"] > seq]
    assert not [m for m in progress if "reset" in m], progress

    # kubelet_healthz_port: the kubelet's config rewritten, the kubelet restarted on the new port.
    old_port = yaml.safe_load((node.root / "var/lib/kubelet/config.yaml").read_text())["healthzPort"]
    old_pid = _kubelet_pid(node)
    new_port = free_port()
    seq = _seq_now(node)
    _restart_with(node, _with(node.config_path.read_text(), kubelet_healthz_port=str(new_port)))
    status = _settled(node, events, since_seq=seq)
    assert status["config_drift"] == [], status
    assert yaml.safe_load((node.root / "var/lib/kubelet/config.yaml").read_text())["healthzPort"] == new_port
    assert _healthz(new_port) == "200"
    assert _healthz(old_port).startswith("error"), "the old kubelet still answers on its port"
    assert _kubelet_pid(node) != old_pid
    _configmap_kept(node)
    assert set(EXTRA_SANS) <= _served_sans(node)


def test_node_ip_and_pod_subnet_changed_with_sans_are_refused_with_reset_required_while_the_sans_are_applied(
    make_node: Callable[..., Node],
) -> None:
    node = make_node()
    events = _install(node, "inst-reset")
    kubeadm_config = node.root / "var/lib/lifecycle/kubeadm.yaml"
    installed = {doc["kind"]: doc for doc in yaml.safe_load_all(kubeadm_config.read_text())}

    seq = _seq_now(node)
    _restart_with(node, _with(node.config_path.read_text(), node_ip='"127.0.0.2"', pod_subnet='"10.245.0.0/16"',
                              extra_sans=json.dumps(EXTRA_SANS)))
    status = _settled(node, events, since_seq=seq)
    drift = {item["key"]: item for item in status["config_drift"]}
    assert set(drift) == {"kubernetes.node_ip", "kubernetes.pod_subnet"}, status
    assert (drift["kubernetes.node_ip"]["installed"], drift["kubernetes.node_ip"]["configured"]) == (
        "127.0.0.1", "127.0.0.2")
    assert (drift["kubernetes.pod_subnet"]["installed"], drift["kubernetes.pod_subnet"]["configured"]) == (
        "10.244.0.0/16", "10.245.0.0/16")
    _configmap_kept(node)
    served = _served_sans(node)
    assert set(EXTRA_SANS) <= served, served  # applied live
    assert "127.0.0.1" in served and "127.0.0.2" not in served, served  # the cluster keeps its installed address
    now = {doc["kind"]: doc for doc in yaml.safe_load_all(kubeadm_config.read_text())}
    assert now["InitConfiguration"] == installed["InitConfiguration"]
    assert now["ClusterConfiguration"]["networking"] == installed["ClusterConfiguration"]["networking"]
    assert now["ClusterConfiguration"]["apiServer"]["certSANs"] == EXTRA_SANS
    after = [e for e in _events_of(events.messages, "lifecycle.state.changed") if e["seq"] > seq]
    assert "failed" not in {e["to"] for e in after}, after

    reply = payload(node.request({"id": "again", "action": "install"}, correlation="again"))
    assert (reply["ok"], reply["error"]["code"], reply["state"]) == (False, "reset_required", "running"), reply
    assert "kubernetes.node_ip" in reply["error"]["message"] and "kubernetes.pod_subnet" in reply["error"]["message"]
    shown = subprocess.run([str(LIFECYCLE), "status", "--config", str(node.config_path), "--node", node.name,
                            "--timeout", "20"], capture_output=True, text=True, timeout=60, check=False)
    assert 'waits for a reset: kubernetes.node_ip = "127.0.0.2" (the cluster runs on "127.0.0.1")' in shown.stdout, (
        shown.stdout + shown.stderr)
    _configmap_kept(node)

    # A reset is what applies them: afterwards nothing is pending any more.
    assert payload(node.request({"id": "wipe", "action": "reset"}, correlation="wipe"))["ok"] is True
    assert _wait_state(events, "idle", timeout_s=30, request_id="wipe")["data"]["to"] == "idle"
    assert payload(node.retained("status", lambda m: payload(m)["state"] == "idle", timeout_s=10))["config_drift"] == []
