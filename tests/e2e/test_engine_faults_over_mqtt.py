"""Faults of the node's outside world, seen the way a host backend sees them: the real `lifecycle serve` on the
simulated node, driven and observed over MQTT. A registry that accepts connections and never answers must end the
images step with an error naming the images still pulling (issue 8, defect 8); a cancel during the quiet re-check
after a reboot has nothing to cancel, and the boot brings the node back (defect 4)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import REGISTRY, SimImages
from test_install_over_mqtt import (  # noqa: F401 (make_node: a fixture)
    SIM_CONFIG,
    Node,
    _kill_processes_under,
    _wait_state,
    make_node,
    payload,
)

IMAGES_TIMEOUT_S = 4
T = TypeVar("T")


class RegistryProxy:
    """A TCP server on 127.0.0.1 in front of a registry. Stalled (or with no upstream), it accepts every connection,
    reads what it is sent and never answers (a registry behind a hung proxy); otherwise it forwards the bytes both
    ways. Runs its own loop in a thread; a change of mode drops every connection it holds, so the engine cannot
    keep using one from before."""

    def __init__(self, upstream: tuple[str, int] | None = None) -> None:
        self._upstream = upstream
        self._stalled = upstream is None
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="registry-proxy", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self._stalled or self._upstream is None:
                while await reader.read(65536):
                    pass  # swallow the request: no status line, no headers, ever
                return
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True)
        finally:
            writer.close()

    async def _set_stalled(self, stalled: bool) -> None:
        self._stalled = stalled
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def stall(self) -> None:
        self._call(self._set_stalled(True))

    def release(self) -> None:
        self._call(self._set_stalled(False))

    def close(self) -> None:
        self._call(self._set_stalled(True))
        self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@pytest.fixture
def stalling_registry() -> Iterator[RegistryProxy]:
    server = RegistryProxy()
    yield server
    server.close()


def test_stalled_registry_fails_images_naming_the_images_still_pulling_and_retryable(
    make_node: Callable[..., Node],  # noqa: F811 (the fixture imported above)
    stalling_registry: RegistryProxy,
) -> None:
    text = SIM_CONFIG.read_text().replace('image_repository = "127.0.0.1:5000"',
                                          f'image_repository = "127.0.0.1:{stalling_registry.port}"')
    text = text.replace("[steps.images]\ntimeout_s = 600", f"[steps.images]\ntimeout_s = {IMAGES_TIMEOUT_S}")
    assert f"timeout_s = {IMAGES_TIMEOUT_S}" in text
    node = make_node(config_text=text)
    node.start_service()
    events = node.subscribe("events")
    assert payload(node.request({"id": "stall-1", "action": "install"}, correlation="s1"))["ok"] is True

    def failed(m: dict[str, Any]) -> bool:
        return bool(payload(m)["type"] == "lifecycle.step.failed")

    data = payload(events.wait_for(failed, timeout_s=60))["data"]
    error = data["error"]
    assert (data["state"], error["code"], error["retryable"]) == ("images", "deadline_exceeded", True), error
    details = error["details"]
    assert (details["step"], details["timeout_s"]) == ("images", IMAGES_TIMEOUT_S)
    pulling = [item["image"] for item in details["pulling"]]
    assert len(pulling) == 3, details  # docker.pull_concurrency: the rest wait for a slot
    assert all(f"127.0.0.1:{stalling_registry.port}/" in ref and ref in error["message"] for ref in pulling)
    assert details["waiting"] and all(ref in error["message"] for ref in details["waiting"])
    assert "resumes" in error["message"]
    status = payload(node.retained("status", lambda m: payload(m)["state"] == "failed", timeout_s=10))
    assert status["error"]["details"]["pulling"] == details["pulling"]


def _kubelets_under(root: Path) -> list[int]:
    """Pids of the kubelets started from the node's own binary (not the static pods the simulated kubelet starts
    from the same zipapp, simnode/launch.py: their parent is a kubelet)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if str(root / "usr/bin/kubelet").encode() in argv[:2]:  # [0] or, run by its shebang's python, [1]
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return [pid for pid, parent in parents.items() if parent not in parents]


def test_cancel_during_the_recheck_after_a_reboot_has_nothing_to_cancel_and_the_node_runs_again(
    make_node: Callable[..., Node],  # noqa: F811 (the fixture imported above)
    sim_images: SimImages,
) -> None:
    """Issue 8 defect 4. Since issue 10 part 3 the boot after a restart asks the registry nothing (the registry
    stalled here would hold up the re-check before): the cancel arrives while the boot is under way, in `running`
    or already in a state it re-entered to start the kubelet; either way there is nothing to cancel."""
    host, port = REGISTRY.rsplit(":", 1)
    proxy = RegistryProxy((host, int(port)))
    try:
        repo = sim_images.repo.replace(REGISTRY, f"127.0.0.1:{proxy.port}", 1)
        node = make_node(config_text=SIM_CONFIG.read_text().replace('image_repository = "127.0.0.1:5000"',
                                                                    f'image_repository = "{repo}"'))
        node.start_service()
        events = node.subscribe("events")
        assert payload(node.request({"id": "boot-1", "action": "install"}, correlation="b1"))["ok"] is True
        assert _wait_state(events, "running", timeout_s=240)["data"]["to"] == "running", node.log_path.read_text()
        seq_before = max(payload(m)["data"]["seq"] for m in events.messages)

        node.kill_service()
        _kill_processes_under(node.root)  # as after a reboot: nothing of the node runs any more
        # SIGKILL is not instant: a killed process keeps its /proc entry (and command line) until it has exited.
        gone_by = time.monotonic() + 10
        while _kubelets_under(node.root) and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert not _kubelets_under(node.root)
        proxy.stall()
        node.start_service()
        reply = payload(node.request({"id": "cancel-1", "action": "cancel"}, correlation="c1"))
        assert (reply["ok"], reply.get("note")) == (True, "nothing to cancel"), reply
        assert reply["state"] in ("running", "kubelet", "readiness", "addons"), reply
        proxy.release()

        def changed_after_restart(m: dict[str, Any]) -> bool:
            body = payload(m)
            return (body["type"] == "lifecycle.state.changed" and body["data"]["seq"] > seq_before
                    and body["data"]["to"] in ("running", "failed"))

        last = payload(events.wait_for(changed_after_restart, timeout_s=120))
        assert last["data"]["to"] == "running", node.log_path.read_text()[-3000:]
        repaired = [payload(m)["data"]["to"] for m in events.messages
                    if payload(m)["type"] == "lifecycle.state.changed" and payload(m)["data"]["seq"] > seq_before]
        assert repaired[0] == "kubelet", repaired  # the kubelet was found gone and started again
        assert len(_kubelets_under(node.root)) == 1
        assert "Ready" in node.kubectl("get", "nodes")  # and the API server answers
    finally:
        proxy.close()
        listed = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                                text=True, check=False).stdout.split()
        mine = [ref for ref in listed if ref.startswith(f"127.0.0.1:{proxy.port}/")]
        if mine:
            subprocess.run(["docker", "rmi", *mine], check=False, capture_output=True)
