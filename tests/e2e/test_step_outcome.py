"""A step is judged by what it leaves, not by its exit codes: the real `lifecycle serve` on the simulated node with
a binaries image whose kubeadm only prints "fine" and exits 0 fails at `kubeadm`, naming it (issue 8, defect 22),
not later at the kubelet that finds no configuration."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SimImages
from test_install_over_mqtt import SIM_CONFIG, Node, _in_sim_namespace, _wait_state, make_node, payload  # noqa: F401

VERSION = "v1.31.4"


@pytest.fixture
def fine_kubeadm_image(sim_images: SimImages) -> Iterator[str]:
    """The simulated node's binaries image with /usr/bin/kubeadm replaced by a script that says "fine"."""
    ref = f"{sim_images.repo}/e2e-fine-kubeadm-{uuid.uuid4().hex[:8]}:v1"
    with tempfile.TemporaryDirectory() as tmp:
        context = Path(tmp)
        script = context / "kubeadm"
        script.write_text("#!/bin/sh\necho fine\n")
        script.chmod(0o755)
        base = sim_images.binaries_image(VERSION)
        (context / "Dockerfile").write_text(f"FROM {base}\nCOPY kubeadm /usr/bin/kubeadm\n")
        env = dict(os.environ, DOCKER_BUILDKIT="0")
        subprocess.run(["docker", "build", "-q", "-t", ref, str(context)], check=True, capture_output=True, env=env)
    subprocess.run(["docker", "push", ref], check=True, capture_output=True)
    yield ref
    subprocess.run(["docker", "rmi", "-f", ref], check=False, capture_output=True)


def test_a_kubeadm_that_says_fine_but_writes_nothing_fails_the_kubeadm_step(
    make_node: Callable[..., Node], fine_kubeadm_image: str  # noqa: F811 (the fixture imported above)
) -> None:
    text = re.sub(r"(?m)^binaries_image = .*$", f'binaries_image = "{fine_kubeadm_image}"',
                  _in_sim_namespace(SIM_CONFIG.read_text()))
    node = make_node(config_text=text)
    node.start_service()
    events = node.subscribe("events")
    assert payload(node.request({"id": "fine", "action": "install"}, correlation="f1"))["ok"] is True
    last = _wait_state(events, "running", timeout_s=180)
    assert last["data"]["to"] == "failed", node.log_path.read_text()[-3000:]
    assert last["data"]["from"] == "kubeadm"
    failed = [payload(m)["data"] for m in events.messages if payload(m)["type"] == "lifecycle.step.failed"]
    assert [f["state"] for f in failed] == ["kubeadm"]
    assert failed[0]["error"]["code"] == "step_incomplete"
    assert not (node.root / "var/lib/kubelet/config.yaml").exists()
