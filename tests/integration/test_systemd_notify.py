"""The systemd notify protocol of the service as a process of its own (issue 11, part 3), heard on a datagram
socket the test listens on as systemd would: READY=1 only once `online` is retained, STATUS= lines that follow the
state changes, WATCHDOG=1 at half of WATCHDOG_USEC from the event loop (they stop while the loop is stalled on
purpose), STOPPING=1 at SIGTERM."""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lifecycle_fakes import eventually, write_config
from lifecycle_mqtt import PrivateBroker, ServiceProcess, probe, retained, start_service_process, unique_prefix

from lifecycle.protocol import Topics

WATCHDOG_USEC = 400_000  # pings every 0.2 s
STALL_LOOP_ENV = "LIFECYCLE_FAULT_STALL_LOOP_S"  # lifecycle/__main__.py: SIGUSR1 then blocks the loop


@pytest.fixture(autouse=True)
def _broker(mqtt_broker: tuple[str, int]) -> None:
    """Every test here needs the shared broker."""


@dataclass
class Heard:
    """Datagrams received on the notify socket, with their monotonic arrival time."""

    messages: list[tuple[float, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.messages if m.startswith(prefix)]

    async def wait_for(self, message: str, *, timeout_s: float = 10.0) -> float:
        async with asyncio.timeout(timeout_s):
            while True:
                for t, m in self.messages:
                    if m == message:
                        return t
                self.changed.clear()
                await self.changed.wait()


@asynccontextmanager
async def notify_socket(path: Path) -> AsyncIterator[Heard]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    heard = Heard()
    loop = asyncio.get_running_loop()

    async def listen() -> None:
        while True:
            data = await loop.sock_recv(sock, 4096)
            for line in data.decode().splitlines():  # one datagram may carry several assignments
                heard.messages.append((time.monotonic(), line))
            heard.changed.set()

    task = asyncio.create_task(listen(), name="test-notify-listener")
    try:
        yield heard
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sock.close()


def _start(tmp_path: Path, prefix: str, node: str, env: dict[str, str], *, port: int = 1883) -> ServiceProcess:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    config = write_config(tmp_path / "lifecycle.toml", root=root, node=node, prefix=prefix,
                          broker=f"mqtt://127.0.0.1:{port}")
    return start_service_process(config, root=root, node=node, log_path=tmp_path / "service.log", env_extra=env)


async def test_ready_after_online_is_retained_status_follows_states_and_stopping_at_sigterm(tmp_path: Path) -> None:
    prefix, node = unique_prefix("sdready"), "sd"
    topics = Topics(prefix, node)
    async with notify_socket(tmp_path / "notify.sock") as heard, probe(topics) as p:
        svc = _start(tmp_path, prefix, node, {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
        try:
            await heard.wait_for("READY=1")
            # The prefix is new: nothing was retained on it before this service said `online`.
            assert await retained(topics.availability) == b"online"
            assert not heard.lines("WATCHDOG="), "no WatchdogSec: no pings"

            assert (await p.ask({"id": "i-1", "action": "install"}))["ok"]
            await p.wait_state("running", timeout_s=10)
            await eventually(lambda: any(m.startswith("STATUS=running") for _, m in heard.messages))
            changes = [e["data"]["to"] for e in p.events() if e["type"] == "lifecycle.state.changed"]
            states = [m.removeprefix("STATUS=").split(":")[0] for _, m in heard.lines("STATUS=")]
            shown = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
            assert shown == ["idle", *changes], (shown, changes)
            assert heard.lines("STATUS=")[-1][1] == "STATUS=running: no job running"
            assert any(m.startswith("STATUS=certs: step ") for _, m in heard.messages), heard.lines("STATUS=")

            svc.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(svc.wait, 10) == 0
            assert [m for _, m in heard.messages].count("STOPPING=1") == 1
        finally:
            svc.proc.kill()
            svc.wait()


async def test_watchdog_pings_at_half_the_timeout_and_stop_while_the_loop_is_stalled(tmp_path: Path) -> None:
    prefix, node = unique_prefix("sdwatch"), "wd"
    stall_s = 1.5
    async with notify_socket(tmp_path / "notify.sock") as heard:
        svc = _start(tmp_path, prefix, node, {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                              "WATCHDOG_USEC": str(WATCHDOG_USEC), STALL_LOOP_ENV: str(stall_s)})
        try:
            await heard.wait_for("READY=1")
            await asyncio.sleep(1.2)
            pings = [t for t, _ in heard.lines("WATCHDOG=1")]
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert len(gaps) >= 4
            assert 0.15 <= statistics.median(gaps) <= 0.3, gaps  # WATCHDOG_USEC / 2 = 0.2 s

            stalled_at = time.monotonic()
            svc.proc.send_signal(signal.SIGUSR1)
            await asyncio.sleep(stall_s + 0.8)
            during = [t for t, _ in heard.lines("WATCHDOG=1") if stalled_at + 0.3 < t < stalled_at + stall_s - 0.1]
            assert during == [], "pings went on while the loop was stalled"
            after = [t for t, _ in heard.lines("WATCHDOG=1") if t > stalled_at + stall_s]
            assert after, "pings resume once the loop runs again"
            assert "stalling the event loop" in svc.log()
        finally:
            svc.proc.send_signal(signal.SIGTERM)
            svc.wait()


async def test_no_ready_while_the_broker_is_down_and_ready_once_online_is_retained(tmp_path: Path) -> None:
    prefix, node = unique_prefix("sdlate"), "late"
    (tmp_path / "mosquitto").mkdir()
    broker = PrivateBroker(tmp_path / "mosquitto", PrivateBroker.anonymous)  # not started yet
    async with notify_socket(tmp_path / "notify.sock") as heard:
        svc = _start(tmp_path, prefix, node, {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                              "WATCHDOG_USEC": str(WATCHDOG_USEC)}, port=broker.port)
        try:
            await eventually(lambda: len(heard.lines("WATCHDOG=1")) >= 3, timeout_s=10)  # up, loop running
            await eventually(lambda: any(m.startswith("STATUS=idle") for _, m in heard.messages))  # state loaded
            assert "READY=1" not in [m for _, m in heard.messages], "READY=1 before the broker was reachable"
            broker.start()
            started_at = time.monotonic()
            ready_at = await heard.wait_for("READY=1", timeout_s=15)
            assert ready_at > started_at
            assert await retained(Topics(prefix, node).availability, port=broker.port) == b"online"
        finally:
            svc.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(svc.wait, 10)
            broker.stop()
