"""Boot after a reboot (issue 10 part 3): every process of the node killed, the service restarted with the
registry unreachable (a proxy in front of it that takes connections and never answers, so that any request
would hang and be counted). The boot trusts the local evidence the steps recorded (image ids, binary sizes and
mtimes), starts the kubelet at once and reaches `running` without a single registry connection."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

from conftest import REGISTRY, SimImages
from faultlib import CutProxy, Node, _kill_processes_under, _wait_state, kubelets_under, make_node, payload, wait_until
from test_install_over_mqtt import SIM_CONFIG

__all__ = ["make_node"]  # the fixture, used by name


def test_boot_with_the_registry_down_reaches_running_without_asking_the_registry(
    make_node: Callable[..., Node], sim_images: SimImages,
) -> None:
    host, port = REGISTRY.rsplit(":", 1)
    proxy = CutProxy(upstream_tcp=(host, int(port)))
    try:
        repo = sim_images.repo.replace(REGISTRY, f"127.0.0.1:{proxy.port}", 1)
        node = make_node(config_text=SIM_CONFIG.read_text().replace('image_repository = "127.0.0.1:5000"',
                                                                    f'image_repository = "{repo}"'))
        node.start_service()
        events = node.subscribe("events")
        assert payload(node.request({"id": "install-1", "action": "install"}, correlation="c1"))["ok"] is True
        assert _wait_state(events, "running", timeout_s=240)["data"]["to"] == "running", node.log_path.read_text()
        seq_before = max(payload(m)["data"]["seq"] for m in events.messages)

        node.kill_service()
        _kill_processes_under(node.root)  # a reboot: nothing of the node runs any more
        wait_until(lambda: not kubelets_under(node.root), timeout_s=10, what="the killed kubelet is gone")
        proxy.stall()
        asked_before = proxy.connections
        node.start_service()

        def after_restart(m: dict[str, Any]) -> bool:
            body = payload(m)
            return body["data"].get("seq", 0) > seq_before

        def ended(m: dict[str, Any]) -> bool:
            body = payload(m)
            return (after_restart(m) and body["type"] == "lifecycle.state.changed"
                    and body["data"]["to"] in ("running", "failed"))

        last = payload(events.wait_for(ended, timeout_s=90))
        assert last["data"]["to"] == "running", node.log_path.read_text()[-3000:]
        assert proxy.connections == asked_before, "the boot asked the registry"
        booted = [payload(m) for m in events.messages if after_restart(m)]
        assert [b["data"]["to"] for b in booted if b["type"] == "lifecycle.state.changed"] == [
            "kubelet", "readiness", "addons", "running"]
        notes = [b["data"].get("message", "") for b in booted if b["type"] == "lifecycle.step.progress"]
        assert any(n.startswith("boot fast path: ") and "images" in n and "binaries" in n for n in notes), notes
        assert "Ready" in node.kubectl("get", "nodes")
        # The background check of the binaries' hashes ends with a word of its own (none when something was wrong).
        held = events.wait_for(lambda m: after_restart(m) and "full check of binaries held"
                               in payload(m)["data"].get("message", ""), timeout_s=30)
        assert held
        assert proxy.connections == asked_before
    finally:
        proxy.close()
        listed = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                                text=True, check=False).stdout.split()
        mine = [ref for ref in listed if ref.startswith(f"127.0.0.1:{proxy.port}/")]
        if mine:
            subprocess.run(["docker", "rmi", *mine], check=False, capture_output=True)
