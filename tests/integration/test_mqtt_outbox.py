"""Events produced while the broker is away are kept and delivered after it comes back, in order, without gaps;
the service reconnects on its own. Uses a private Mosquitto (free port, persistence on) stopped and restarted."""


from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lifecycle_fakes import eventually, steer
from lifecycle_mqtt import PrivateBroker, probe, service_config, service_in_process, unique_prefix

from lifecycle.adapters.mqtt import MAX_INFLIGHT
from lifecycle.config import STEP_NAMES


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    b = PrivateBroker(tmp_path, PrivateBroker.anonymous)
    b.start()
    yield b
    b.stop()


async def test_events_during_a_broker_outage_are_delivered_in_order_after_reconnect(
    tmp_path: Path, broker: PrivateBroker
) -> None:
    root = tmp_path / "root"
    config = service_config(root, prefix=unique_prefix("outbox"), port=broker.port)
    for name in STEP_NAMES:
        steer(root, name, run_s=0.15, progress=2)
    session = f"outbox-watcher-{broker.port}"
    async with service_in_process(config) as svc:
        async with probe(svc.topics, port=broker.port, session=session) as p:
            await p.ready()
            assert (await p.ask({"id": "i-1", "action": "install"}))["ok"]
            await p.wait_state("images")
        broker.stop()
        stopped_at = time.time()
        state_file = root / "var/lib/lifecycle/state.json"
        await eventually(lambda: json.loads(state_file.read_text())["state"] == "running", timeout_s=10)
        broker.start()
        restarted_at = time.time()
        async with probe(svc.topics, port=broker.port, session=session) as p2:
            await p2.wait_state("running", timeout_s=10)
            status = await p2.wait_for(lambda m: m.topic == svc.topics.status and m.json()["state"] == "running")
    seqs = [e["data"]["seq"] for e in p.events() + p2.events()]
    unique = sorted(set(seqs))
    assert unique == list(range(1, unique[-1] + 1)), "no gaps"
    # A resend after the outage may repeat what was in flight (up to the bridge's window): first deliveries only.
    first = [seq for index, seq in enumerate(seqs) if seq not in seqs[:index]]
    assert first == sorted(first), "delivered in order"
    assert len(seqs) - len(first) <= MAX_INFLIGHT, "only what was in flight is repeated"
    during = [e for e in p2.events() if stopped_at <= _epoch(e["time"]) <= restarted_at]
    assert len(during) >= 10, "most of the install happened while the broker was down"
    assert status.json()["seq"] == unique[-1]
    assert list((tmp_path / "data").glob("*.db")), "the broker persisted the watcher's session"


def _epoch(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
