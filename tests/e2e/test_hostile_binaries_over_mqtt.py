"""Hostile binaries images against the real `lifecycle serve` (issue 8, defects 20 and 21): the simulated node's
binaries image with one member made hostile (a tar ADDed on top: setuid, a file capability, a hard link to
/etc/secret) is refused at `binaries` with `bad_image` naming the file; nothing is installed, and the service
still answers."""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SimImages
from test_install_over_mqtt import SIM_CONFIG, Node, _in_sim_namespace, _wait_state, make_node, payload  # noqa: F401

VERSION = "v1.31.4"
CAP_NET_ADMIN = 12


def _overlay(kind: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = b"#!/bin/sh\necho hostile\n"
        if kind == "hard-link":
            secret = tarfile.TarInfo("etc/secret")
            secret.size, secret.mode = len(data), 0o600
            tar.addfile(secret, io.BytesIO(data))
            link = tarfile.TarInfo("usr/bin/kubelet")
            link.type, link.linkname = tarfile.LNKTYPE, "etc/secret"
            tar.addfile(link)
        else:
            info = tarfile.TarInfo("usr/bin/kubelet")
            info.size, info.mode = len(data), 0o4755 if kind == "setuid" else 0o755
            if kind == "file-capability":
                cap = (0x02000001).to_bytes(4, "little") + (1 << CAP_NET_ADMIN).to_bytes(4, "little") + bytes(12)
                info.pax_headers = {"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape")}
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _hostile_image(sim_images: SimImages, kind: str) -> str:
    ref = f"{sim_images.repo}/e2e-hostile-{kind}-{uuid.uuid4().hex[:8]}:v1"
    with tempfile.TemporaryDirectory() as tmp:
        context = Path(tmp)
        (context / "overlay.tar").write_bytes(_overlay(kind))
        (context / "Dockerfile").write_text(f"FROM {sim_images.binaries_image(VERSION)}\nADD overlay.tar /\n")
        env = dict(os.environ, DOCKER_BUILDKIT="0")
        subprocess.run(["docker", "build", "-q", "-t", ref, str(context)], check=True, capture_output=True, env=env)
    subprocess.run(["docker", "push", ref], check=True, capture_output=True)
    return ref


@pytest.mark.parametrize(("kind", "why"), [
    ("setuid", "mode 4755 has setuid"),
    ("file-capability", "extended attributes security.capability"),
    ("hard-link", "a hard link to /etc/secret"),
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
