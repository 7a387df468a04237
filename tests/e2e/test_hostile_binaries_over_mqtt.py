"""Hostile binaries images against the real `lifecycle serve` (issue 8, defects 20 and 21): the simulated node's
binaries image with one member made hostile (a layer on top, simnode/hostile.py: setuid, a file capability, a
hard link to /etc/lifecycle-secret) is refused at `binaries` with `bad_image` naming the file; nothing is
installed, and the service still answers. All 20 variants run in tests/faults/test_hostile_images.py."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Callable

import pytest
from conftest import SimImages
from test_install_over_mqtt import SIM_CONFIG, Node, _in_sim_namespace, _wait_state, make_node, payload  # noqa: F401

from simnode.hostile import build_all

VERSION = "v1.31.4"


def _hostile_image(sim_images: SimImages, kind: str) -> str:
    """The variant `kind` of simnode/hostile.py, pushed under a repository of the test's own."""
    registry, _, namespace = sim_images.repo.partition("/")
    repo = f"{namespace + '/' if namespace else ''}e2e-hostile-{uuid.uuid4().hex[:8]}/desktop-kubernetes"
    [(_, ref)] = build_all(registry=registry, repo=repo, version=VERSION, namespace=namespace, kinds=[kind])
    return ref


@pytest.mark.parametrize(("kind", "why"), [
    ("setuid", "mode 4755 has setuid"),
    ("file-capability", "extended attributes security.capability"),
    ("hard-link", "a hard link to /etc/lifecycle-secret"),
])
def test_a_hostile_kubelet_is_refused_by_name_and_nothing_is_installed(
    make_node: Callable[..., Node], sim_images: SimImages, kind: str, why: str  # noqa: F811 (fixture imported above)
) -> None:
    image = _hostile_image(sim_images, kind)
    try:
        text = re.sub(r"(?m)^binaries_image = .*$", f'binaries_image = "{image}"',
                      _in_sim_namespace(SIM_CONFIG.read_text()))
        node = make_node(config_text=text)
        node.start_service()
        events = node.subscribe("events")
        assert payload(node.request({"id": "hostile", "action": "install"}, correlation="h1"))["ok"] is True
        last = _wait_state(events, "running", timeout_s=120)
        assert (last["data"]["from"], last["data"]["to"]) == ("binaries", "failed"), node.log_path.read_text()[-3000:]
        error = next(payload(m)["data"]["error"] for m in events.messages
                     if payload(m)["type"] == "lifecycle.step.failed")
        assert error["code"] == "bad_image" and error["details"]["file"] == "/usr/bin/kubelet"
        assert error["message"].startswith("/usr/bin/kubelet") and why in error["message"], error
        written = [p for d in ("usr/bin", "opt/cni/bin") if (node.root / d).is_dir() for p in (node.root / d).iterdir()
                   if p.name in {"kubeadm", "kubelet", "kubectl", "crictl", "bridge", "host-local", "loopback",
                                 "portmap"} or ".lifecycle-" in p.name]
        assert written == [], "no binary and no temp file"
        assert not (node.root / "var/lib/lifecycle/binaries.json").exists()
        assert payload(node.request({"id": "still-there", "action": "status"}, correlation="h2"))["ok"] is True
    finally:
        subprocess.run(["docker", "rmi", "-f", image], check=False, capture_output=True)
