"""Faults of the node's outside world, seen the way a host backend sees them: the real `lifecycle serve` on the
simulated node, driven and observed over MQTT. A registry that accepts connections and never answers must end the
images step with an error naming the images still pulling (issue 8, defect 8)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from test_install_over_mqtt import SIM_CONFIG, Node, make_node, payload  # noqa: F401 (a fixture)

IMAGES_TIMEOUT_S = 4


class StallingRegistry:
    """A TCP server on 127.0.0.1 that accepts every connection, reads what it is sent and never answers (a registry
    behind a hung proxy). Runs its own loop in a thread; `close` drops every connection it holds."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._writers: list[asyncio.StreamWriter] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="stalling-registry", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=5)
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._hold, "127.0.0.1", 0)

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        while await reader.read(65536):
            pass  # swallow the request: no status line, no headers, ever

    async def _close(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


@pytest.fixture
def stalling_registry() -> Iterator[StallingRegistry]:
    server = StallingRegistry()
    yield server
    server.close()


def test_stalled_registry_fails_images_naming_the_images_still_pulling_and_retryable(
    make_node: Callable[..., Node],  # noqa: F811 (the fixture imported above)
    stalling_registry: StallingRegistry,
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
