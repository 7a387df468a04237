"""The 20 hostile binaries images of `simnode.hostile` (issue 8), each against the real `lifecycle serve` over
MQTT: the install fails at the variant's step (`binaries`, or `images` where the engine refuses the layer at
pull) with a documented code and a message naming the member; nothing is installed or written outside the node
root, no file under the root carries setuid/setgid/sticky bits or is a device or FIFO, no copy container is
left, and the service still answers `status`."""

from __future__ import annotations

import re
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SimImages
from faultlib import Node, _wait_state, engine_leftovers, make_node, payload
from test_install_over_mqtt import SIM_CONFIG, _in_sim_namespace

from simnode.hostile import OVERSIZE_LIMIT_BYTES, Variant, build_all, variants

__all__ = ["make_node"]  # the fixture, used by name

VERSION = "v1.31.4"
VARIANTS = {v.kind: v for v in variants()}
# Where the variants aim on the host if anything escaped the node root (none may exist after a test).
HOST_MARKS = ("/usr/bin/kubelet", "/etc/lifecycle-secret", "/usr/bin/kubelet-real", "/usr/bin/kubelet-a")
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


@pytest.fixture(scope="module")
def hostile_refs(sim_images: SimImages) -> Iterator[dict[str, str]]:
    """Every variant pushed under a repository of this run's own: kind -> image reference."""
    registry, _, namespace = sim_images.repo.partition("/")
    repo = f"{namespace + '/' if namespace else ''}hostile-{uuid.uuid4().hex[:8]}/desktop-kubernetes"
    built = build_all(registry=registry, repo=repo, version=VERSION, namespace=namespace)
    refs = {variant.kind: ref for variant, ref in built}
    yield refs
    subprocess.run(["docker", "rmi", "-f", *refs.values()], check=False, capture_output=True)


def _config(image: str) -> str:
    text = _in_sim_namespace(SIM_CONFIG.read_text())
    # One limit for every variant: over the simulated tools (a few hundred KiB), under the oversized member.
    return re.sub(r"(?m)^binaries_image = .*$",
                  f'binaries_image = "{image}"\nbinary_max_bytes = {OVERSIZE_LIMIT_BYTES}', text)


def _files(root: Path) -> dict[str, int]:
    """Every path under the node root (no directory followed) -> its lstat mode."""
    return {str(p.relative_to(root)): p.lstat().st_mode for p in root.rglob("*")}


def test_twenty_variants_cover_the_issue() -> None:
    assert len(VARIANTS) == 20
    assert {"abs-symlink-out", "rel-symlink-out", "symlink-loop", "dotdot-name", "hard-link",
            "symlink-to-hard-link", "char-device", "block-device", "fifo", "directory", "setuid", "setgid", "sticky",
            "file-capability", "user-xattr", "whiteout", "opaque-whiteout", "symlink-then-file", "oversized",
            "missing-member"} == set(VARIANTS)


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_a_hostile_binaries_image_is_refused_by_name_and_leaves_nothing(
    make_node: Callable[..., Node], hostile_refs: dict[str, str], kind: str
) -> None:
    variant: Variant = VARIANTS[kind]
    node = make_node(config_text=_config(hostile_refs[kind]))
    before = _files(node.root)
    node.start_service()
    events = node.subscribe("events")
    assert payload(node.request({"id": "hostile", "action": "install"}, correlation="h1"))["ok"] is True

    last = _wait_state(events, "running", timeout_s=120)
    assert (last["data"]["from"], last["data"]["to"]) == (variant.step, "failed"), node.log_path.read_text()[-3000:]
    error = next(payload(m)["data"]["error"] for m in events.messages
                 if payload(m)["type"] == "lifecycle.step.failed")
    assert error["code"] == variant.code, error
    assert variant.member in error["message"] and variant.reason in error["message"], error
    assert error["retryable"] is False, "an image at fault does not get better by trying again"

    after = _files(node.root)
    created = sorted(set(after) - set(before))
    files = [p for p in created if not stat.S_ISDIR(after[p])]  # the step makes the target directories
    assert [p for p in files if p.startswith(("usr/", "opt/")) or ".lifecycle-" in p] == [], "no binary, no temp file"
    assert not (node.root / "var/lib/lifecycle/binaries.json").exists()
    odd = {p: oct(m) for p, m in after.items()
           if not stat.S_ISDIR(m) and (m & SPECIAL_BITS or stat.S_ISCHR(m) or stat.S_ISBLK(m) or stat.S_ISFIFO(m))}
    assert odd == {}, "no special bits, device or FIFO under the root"
    assert [mark for mark in HOST_MARKS if Path(mark).exists()] == [], "nothing written outside the root"
    assert engine_leftovers(node.name) == [], "no copy container left"

    status = payload(node.request({"id": "still-there", "action": "status"}, correlation="h2"))
    assert status["ok"] is True and status["state"] == "failed", status
