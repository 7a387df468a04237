"""The container the binaries step copies from, across a SIGKILL of the real `lifecycle serve`: the kill comes the
moment the engine reports the container created (`docker events`), the restarted service resumes, and no container
of the node is left in the engine once it is `running` (issue 8, defect 2)."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable

from conftest import SimImages
from test_install_over_mqtt import Node, _wait_state, make_node, payload  # noqa: F401 (a fixture)

VERSION = "v1.31.4"


class CreateWatch:
    """`docker events` for container creations from `image`; `created` is set at the first one."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.created = threading.Event()
        self.ids: list[str] = []
        self.proc = subprocess.Popen(
            ["docker", "events", "--format", "{{json .}}", "--filter", "type=container", "--filter", "event=create"],
            stdout=subprocess.PIPE, text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            if event.get("Actor", {}).get("Attributes", {}).get("image") == self.image:
                self.ids.append(event["Actor"]["ID"])
                self.created.set()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)


def _containers(*filters: str) -> list[str]:
    argv = ["docker", "ps", "-a", "-q"]
    for f in filters:
        argv += ["--filter", f]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()


def test_sigkill_while_copying_binaries_leaves_no_copy_container_after_the_resumed_install(
    make_node: Callable[..., Node], sim_images: SimImages  # noqa: F811 (the fixture imported above)
) -> None:
    image = sim_images.binaries_image(VERSION)
    node = make_node()
    watch = CreateWatch(image)
    try:
        node.start_service()
        events = node.subscribe("events")
        assert payload(node.request({"id": "kill-in-binaries", "action": "install"}, correlation="b1"))["ok"]
        assert watch.created.wait(timeout=120), "the binaries step never created its copy container"
        node.kill_service()
        left = [c for c in _containers(f"ancestor={image}") if any(i.startswith(c) for i in watch.ids)]
        assert left, "the kill came after the container was removed: nothing tested"

        node.start_service()
        last = _wait_state(events, "running", timeout_s=180)
        assert last["data"]["to"] == "running", node.log_path.read_text()[-3000:]
        assert _containers(f"label=lifecycle.node={node.name}") == []
        remaining = [c for c in _containers(f"ancestor={image}") if any(i.startswith(c) for i in watch.ids)]
        assert remaining == [], f"copy containers left in the engine: {remaining}"
    finally:
        watch.close()
        if watch.ids:  # whatever the outcome, the shared engine keeps nothing of this test
            subprocess.run(["docker", "rm", "-f", *watch.ids], capture_output=True, check=False)


def test_reset_removes_a_copy_container_the_node_left(
    make_node: Callable[..., Node], sim_images: SimImages  # noqa: F811 (the fixture imported above)
) -> None:
    """A copy container that appears after the start's clean-up (as one the engine still held when the service
    started, or a killed copy's): a reset to `idle` must not leave it behind (issue 8, leftover a)."""
    node = make_node()
    node.start_service()  # its start-up removal of leftovers has run: the service is online
    events = node.subscribe("events")
    left = subprocess.run(
        ["docker", "create", "--label", f"lifecycle.node={node.name}", "--label", "lifecycle.role=binaries-copy",
         sim_images.binaries_image(VERSION), "/nonexistent"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    try:
        assert payload(node.request({"id": "reset-1", "action": "reset"}, correlation="r1"))["ok"] is True
        idle = _wait_state(events, "idle", timeout_s=60, request_id="reset-1")
        assert idle["data"]["to"] == "idle", node.log_path.read_text()[-3000:]
        assert _containers(f"label=lifecycle.node={node.name}") == []
        removed = [payload(m)["data"]["message"] for m in events.messages
                   if payload(m)["type"] == "lifecycle.step.progress" and left[:12] in payload(m)["data"]["message"]]
        assert removed, "the reset did not say which container it removed"
    finally:
        subprocess.run(["docker", "rm", "-f", left], capture_output=True, check=False)
