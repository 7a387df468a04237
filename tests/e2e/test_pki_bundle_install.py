"""A host-made PKI on the simulated node, end to end: bundles made with the openssl CLI alone are sent with
`mosquitto_pub` to the real `lifecycle serve`; the API server then serves a certificate that `openssl s_client`
verifies against the bundle's CA, and the real kubectl works with the kubeconfig fetched by a `kubeconfig`
request (`lifecycle kubeconfig -o FILE`). Everything the service publishes under `lifecycle/<node>/#` and every
line it logs, through two installs and two resets, carries no private key (the CLI's kubeconfig replies included:
they go outside that tree).
"""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from openssl_pki import OpensslPki, key_bodies
from test_install_over_mqtt import LIFECYCLE, Node, Subscriber, _wait_state, make_node, payload

__all__ = ["make_node"]  # the fixture, used by name

ENDPOINT = "localhost"  # simnode/lifecycle.toml


class Capture:
    """`mosquitto_sub` on `lifecycle/<node>/#`, every message as `topic<TAB>payload` in a file."""

    def __init__(self, node: Node, path: Path) -> None:
        self.path = path
        self._out = path.open("w")
        self.proc = subprocess.Popen(
            ["mosquitto_sub", "-V", "mqttv5", "-q", "1", "-t", node.topic("#"), "-F", "%t\t%p"], stdout=self._out,
        )
        time.sleep(0.3)

    def lines(self) -> list[tuple[str, str]]:
        if not self._out.closed:
            self._out.flush()
        return [tuple(line.split("\t", 1)) for line in self.path.read_text().splitlines() if "\t" in line]  # type: ignore[misc]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)
        self._out.close()


def keys_on_node(root: Path) -> list[str]:
    """Every private key the node holds: the PKI's, the kubeconfigs' and the kubelet's (PEM text)."""
    pems = [p.read_text() for p in (root / "etc/kubernetes/pki").rglob("*.key")]
    pems += [p.read_text() for p in (root / "var/lib/kubelet/pki").glob("*.pem")]
    for conf in (root / "etc/kubernetes").glob("*.conf"):
        for user in (yaml.safe_load(conf.read_text()) or {}).get("users") or []:
            data = (user.get("user") or {}).get("client-key-data")
            if data:
                pems.append(base64.b64decode(data).decode())
    return pems


def api_port(root: Path) -> int:
    server = yaml.safe_load((root / "etc/kubernetes/admin.conf").read_text())["clusters"][0]["cluster"]["server"]
    return int(server.rsplit(":", 1)[1])


def s_client(port: int, ca: Path) -> tuple[str, str]:
    """(openssl s_client's verdict line, the serial of the certificate the API server served)."""
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", ENDPOINT, "-CAfile", str(ca),
         "-showcerts"], input=b"", capture_output=True, timeout=30, check=False,
    ).stdout.decode(errors="replace")
    verdict = next((line.strip() for line in out.splitlines() if "Verify return code" in line), out[-500:])
    served = out[out.index("-----BEGIN CERTIFICATE-----"):out.index("-----END CERTIFICATE-----") + 25]
    serial = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=served.encode(), capture_output=True,
                            check=True, timeout=30).stdout.decode().strip()
    return verdict, serial


def serial_of(cert: Path) -> str:
    return subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(cert)], capture_output=True,
                          check=True, timeout=30, text=True).stdout.strip()


def fetch_kubeconfig(node: Node, target: Path) -> None:
    """`lifecycle kubeconfig -o FILE`, the CLI's own request and reply (on lifecycle-replies/<node>/<id>, outside
    what a subscriber of lifecycle/<node>/# sees)."""
    out = subprocess.run([str(LIFECYCLE), "kubeconfig", "--config", str(node.config_path), "--node", node.name,
                          "-o", str(target)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def kubectl(kubeconfig: Path, *args: str) -> str:
    out = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def install(node: Node, events: Subscriber, bundle: dict[str, str], request_id: str) -> None:
    reply = payload(node.request({"id": request_id, "action": "install", "pki": bundle}, correlation=request_id))
    assert reply["ok"] and reply["note"] == "install started", reply
    last = _wait_state(events, "running", timeout_s=240, request_id=request_id)
    assert last["data"]["to"] == "running", node.log_path.read_text()[-3000:]


def reset(node: Node, events: Subscriber, request_id: str) -> None:
    assert payload(node.request({"id": request_id, "action": "reset"}, correlation=request_id))["ok"]
    last = _wait_state(events, "idle", timeout_s=120, request_id=request_id)
    assert last["data"]["to"] == "idle", node.log_path.read_text()[-3000:]


def test_openssl_bundles_install_a_cluster_that_serves_their_ca_and_no_key_leaks(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node()
    cas_only = OpensslPki(tmp_path / "cas", node=node.name, endpoint=ENDPOINT).cas_only()
    full = OpensslPki(tmp_path / "full", node=node.name, endpoint=ENDPOINT).cas_only().with_leaves()
    node.start_service()
    capture = Capture(node, tmp_path / "capture.txt")
    events = node.subscribe("events")
    keys = [*cas_only.bundle().values(), *full.bundle().values()]
    pki = node.root / "etc/kubernetes/pki"
    try:
        early = payload(node.request({"id": "k-0", "action": "kubeconfig"}, correlation="k-0"))
        assert (early["ok"], early["error"]["code"]) == (False, "not_ready")

        # 1. The CAs alone: the service issues every leaf and kubeconfig from them.
        install(node, events, cas_only.bundle(), "with-cas")
        assert all((pki / name).read_text() == pem for name, pem in cas_only.bundle().items())
        verdict, _ = s_client(api_port(node.root), cas_only.dir / "ca.crt")
        assert verdict == "Verify return code: 0 (ok)", verdict
        reply = node.request({"id": "k-1", "action": "kubeconfig"}, correlation="k-1")
        assert payload(reply)["ok"] and 0 < reply["properties"]["message-expiry-interval"] <= 60
        kubeconfig = tmp_path / "kubeconfig"
        fetch_kubeconfig(node, kubeconfig)
        assert kubeconfig.read_text() == payload(reply)["kubeconfig"]
        nodes = json.loads(kubectl(kubeconfig, "get", "nodes", "-o", "json"))["items"]
        assert [n["metadata"]["name"] for n in nodes] == [node.name]
        assert "kube-apiserver" in kubectl(kubeconfig, "get", "pods", "-A")
        keys += keys_on_node(node.root)
        reset(node, events, "reset-1")

        # 2. CAs and every leaf: all kept as they are; the API server serves the host's own certificate.
        install(node, events, full.bundle(), "with-leaves")
        assert all((pki / name).read_text() == pem for name, pem in full.bundle().items())
        verdict, serial = s_client(api_port(node.root), full.dir / "ca.crt")
        assert verdict == "Verify return code: 0 (ok)" and serial == serial_of(full.dir / "apiserver.crt")
        fetch_kubeconfig(node, kubeconfig)
        assert "coredns" in kubectl(kubeconfig, "get", "pods", "-A")
        wrong_ca, _ = s_client(api_port(node.root), cas_only.dir / "ca.crt")
        assert wrong_ca != "Verify return code: 0 (ok)"
        keys += keys_on_node(node.root)
        reset(node, events, "reset-2")
    finally:
        capture.close()

    bodies = key_bodies(keys)
    assert len(bodies) > 50
    messages = capture.lines()
    assert any(topic.endswith("/events") for topic, _ in messages)
    for topic, text in messages:
        if topic == node.topic("requests"):
            continue  # the test's own requests; the CLI's kubeconfig replies are not under lifecycle/<node>/ (#19)
        assert "PRIVATE KEY" not in text and not any(b in text for b in bodies), f"key material on {topic}"
        assert "client-key-data" not in text, f"a kubeconfig on {topic}"  # its key is base64 of the PEM
    log = node.log_path.read_text()
    assert "pki bundle written" in log
    assert "PRIVATE KEY" not in log
    leaked = [b for b in bodies if b in log]
    assert not leaked, f"{len(leaked)} key lines in the service log"
