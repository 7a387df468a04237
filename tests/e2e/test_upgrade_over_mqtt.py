"""Upgrade in place (issue 10, part 1), the way a host backend sees it: the real `lifecycle serve` on the simulated
node, driven with MQTT, checked with kubectl: a v1.31.4 cluster with a Deployment, a ConfigMap and a Secret is
upgraded to v1.32.1 and keeps them; refusals (minor skip, downgrade, same version) change nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import SimImages
from test_install_over_mqtt import SIM_CONFIG, Node, _state_changes, _wait_state, make_node, payload

from simnode import versions as v

__all__ = ["make_node"]  # the fixture, used by name

UPGRADE_CHAIN = ["running", "upgrade_images", "upgrade_binaries", "upgrade_plan", "upgrade_apply", "upgrade_kubelet",
                 "upgrade_readiness", "running"]
# A version the config lists but a v1.31 cluster cannot reach in one step (no images needed: refused first).
SKIP_VERSION_TOML = """
[kubernetes.versions."v1.33.0"]
etcd = "3.5.16-0"
coredns = "v1.11.3"
pause = "3.10"
cni = "v1.6.0"
critools = "v1.31.1"
cri_dockerd = "v0.3.16"
"""


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of what an upgrade would change: binaries, manifests, the kubeadm config and stamp, the state."""
    files = [*sorted((root / "usr/bin").iterdir()), *sorted((root / "etc/kubernetes/manifests").iterdir()),
             root / "var/lib/lifecycle/kubeadm.yaml", root / "var/lib/lifecycle/kubeadm.stamp.json",
             root / "var/lib/lifecycle/binaries.json"]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def _refused(node: Node, version: str, code: str, correlation: str) -> dict[str, Any]:
    answer = payload(node.request({"id": correlation, "action": "upgrade", "kubernetes_version": version},
                                  correlation=correlation))
    assert answer["ok"] is False and answer["error"]["code"] == code, answer
    return answer


def _private_binaries(sim_images: SimImages) -> tuple[str, dict[str, str]]:
    """The binaries image of both versions under a namespace of the test's own, with a layer of its own on top,
    in the registry only: the upgrade's pull of the new one downloads something (byte progress), whatever the
    engine holds of the shared tags. (tests/e2e/test_install_over_mqtt.py `private_images` does this for every
    image of v1.31.4; the binaries image is the one image of the upgrade not shared between the versions that the
    config names by a template of its own.) Returns the private repository and version -> reference."""
    repo = f"{sim_images.repo}/e2e-up-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    refs: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for version in ("v1.31.4", "v1.32.1"):
            source = sim_images.binaries[version]
            ref = source.replace(f"{sim_images.repo}/", f"{repo}/", 1)
            context = Path(tmp) / version
            context.mkdir()
            (context / "nonce").write_bytes(os.urandom(256 * 1024))
            (context / "Dockerfile").write_text(f"FROM {source}\nCOPY nonce /e2e-nonce\n")
            subprocess.run(["docker", "build", "-q", "-t", ref, str(context)], check=True, capture_output=True,
                           env=env)
            subprocess.run(["docker", "push", ref], check=True, capture_output=True)
            subprocess.run(["docker", "rmi", ref], check=True, capture_output=True)
            refs[version] = ref
    return repo, refs


def _pods_running(node: Node, selector: str, count: int, *, timeout_s: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        pods = json.loads(node.kubectl("get", "pods", "-l", selector, "-o", "json"))["items"]
        running = [p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running"]
        if len(running) >= count:
            return running
        assert time.monotonic() < deadline, f"{selector}: {[p['status'] for p in pods]}"
        time.sleep(0.3)


def test_upgrade_keeps_objects_and_workloads_and_refusals_change_nothing(
    make_node: Callable[..., Node], sim_images: SimImages
) -> None:
    private, binaries = _private_binaries(sim_images)
    config = SIM_CONFIG.read_text().replace('binaries_image = "{repo}/', f'binaries_image = "{private}/', 1)
    assert private in config
    node = make_node(config_text=config + SKIP_VERSION_TOML)
    node.start_service()
    events = node.subscribe("events")
    assert payload(node.request({"id": "up-install", "action": "install"}, correlation="up-install"))["ok"] is True
    last = _wait_state(events, "running", timeout_s=180, request_id="up-install")
    assert last["data"]["to"] == "running", node.log_path.read_text()[-3000:]

    node.kubectl("create", "deployment", "web", f"--image={v.http_echo_image(sim_images.repo)}", "--port=8080")
    node.kubectl("create", "configmap", "kept", "--from-literal=answer=42")
    node.kubectl("create", "secret", "generic", "hidden", "--from-literal=password=s3cret")
    [before_pod] = _pods_running(node, "app=web", 1)

    # Refused before anything changes: a minor skip, the same version, a version not configured, a bad one.
    status = payload(node.retained("status", lambda m: payload(m)["state"] == "running", timeout_s=10))
    hashes = _hashes(node.root)
    skip = _refused(node, "v1.33.0", "upgrade_not_allowed", "up-skip")
    assert "skips a minor version" in skip["error"]["message"]
    assert "already runs" in _refused(node, "v1.31.4", "upgrade_not_allowed", "up-same")["error"]["message"]
    _refused(node, "v1.40.0", "unsupported_version", "up-unknown")
    _refused(node, "1.32", "invalid_request", "up-malformed")
    assert _hashes(node.root) == hashes
    after = payload(node.retained("status", lambda m: True, timeout_s=10))
    assert (after["state"], after["seq"], after["kubernetes_version"]) == ("running", status["seq"], "v1.31.4")

    started = time.monotonic()
    events.messages.clear()
    reply = payload(node.request({"id": "up-1", "action": "upgrade", "kubernetes_version": "v1.32.1"},
                                 correlation="up-1"))
    assert reply["ok"] is True and reply["note"] == "upgrade started", reply
    last = _wait_state(events, "running", timeout_s=120, request_id="up-1")
    took_s = time.monotonic() - started
    assert last["data"]["to"] == "running", node.log_path.read_text()[-4000:]
    changes = [c for c in _state_changes(events.messages) if c["data"]["request_id"] == "up-1"]
    assert [c["data"]["from"] for c in changes] + [changes[-1]["data"]["to"]] == UPGRADE_CHAIN
    bodies = [payload(m) for m in events.messages]
    assert not [b for b in bodies if b["type"] == "lifecycle.step.failed"]
    # The target's images: pulled with byte progress, or found present (the shared engine holds most of them);
    # nothing of the old version's.
    pulled = [b["data"]["message"] for b in bodies if b["type"] == "lifecycle.step.progress"
              and b["data"]["state"] == "upgrade_images"]
    assert pulled and not [m for m in pulled if "v1.31.4" in m or "3.5.15-0" in m], pulled
    # The new binaries image is in the registry only: its pull is reported in bytes, to the end.
    new_bytes = [b["data"] for b in bodies if b["type"] == "lifecycle.step.progress"
                 and b["data"]["state"] == "upgrade_images" and b["data"]["unit"] == "bytes"]
    assert {d["message"] for d in new_bytes} == {f"pulling {binaries['v1.32.1']}"}, new_bytes
    assert new_bytes[-1]["current"] == new_bytes[-1]["total"] > 0, new_bytes
    # A total of None: the size not known yet (the first report of a layer).
    assert all(d["total"] is None or 0 <= d["current"] <= d["total"] for d in new_bytes), new_bytes
    phases = {b["data"]["message"] for b in bodies if b["type"] == "lifecycle.step.progress"
              and b["data"]["state"] == "upgrade_apply"}
    assert '[upgrade/successful] SUCCESS! Your cluster was upgraded to "v1.32.1". Enjoy!' in phases, phases

    status = payload(node.retained("status", lambda m: payload(m)["state"] == "running", timeout_s=10))
    assert status["kubernetes_version"] == "v1.32.1" and status["error"] is None
    server = json.loads(node.kubectl("version", "-o", "json"))["serverVersion"]["gitVersion"]
    assert server == "v1.32.1"
    kubelet = subprocess.run([str(node.root / "usr/bin/kubelet"), "--version"], capture_output=True, text=True,
                             check=True, timeout=20).stdout
    assert "v1.32.1" in kubelet, kubelet
    assert "answer" in node.kubectl("get", "configmap", "kept", "-o", "jsonpath={.data}")
    assert node.kubectl("get", "secret", "hidden", "-o", "jsonpath={.data.password}").strip()
    assert before_pod in _pods_running(node, "app=web", 1)
    assert " Ready " in node.kubectl("get", "nodes", node.name)
    stored = node.kubectl("get", "cm", "kubeadm-config", "-n", "kube-system", "-o", "jsonpath={.data}")
    assert "v1.32.1" in stored
    assert not (node.root / "var/lib/lifecycle/upgrade").exists()  # the staged binaries are gone

    # A downgrade and an install of the old version are refused; nothing moves.
    hashes = _hashes(node.root)
    downgrade = _refused(node, "v1.31.4", "upgrade_not_allowed", "up-down")
    assert "downgrades are not supported" in downgrade["error"]["message"]
    install_old = payload(node.request({"id": "up-inst-old", "action": "install", "kubernetes_version": "v1.31.4"},
                                       correlation="up-inst-old"))
    assert install_old["ok"] is False and install_old["error"]["code"] == "upgrade_unsupported", install_old
    assert _hashes(node.root) == hashes
    final = payload(node.retained("status", lambda m: True, timeout_s=10))
    assert (final["state"], final["seq"], final["kubernetes_version"]) == ("running", status["seq"], "v1.32.1")
    print(f"upgrade v1.31.4 -> v1.32.1 over MQTT: {took_s:.1f} s")
    for ref in binaries.values():
        subprocess.run(["docker", "rmi", "-f", ref], check=False, capture_output=True)
