"""A reply's `state` is the state when it was sent (docs/protocol.md): the state of the last change a subscriber
heard before the reply. Since events leave when made (the bridge's send on offer, issue 11), an install's reply,
sent from a task of its own, came after the job's first change and still said `idle` (found by
tests/faults/test_conflicting_requests.py, whose driver reads the reply's state to know where the node is). Real
Mosquitto, the real service in this process; one subscriber connection hears both topics in the broker's order."""

from __future__ import annotations

from pathlib import Path

from lifecycle_mqtt import Received, probe, service_config, service_in_process, unique_prefix


def _changes_before(seen: list[Received], events_topic: str, index: int) -> list[dict[str, object]]:
    return [m.json()["data"] for m in seen[:index]
            if m.topic == events_topic and m.json()["type"] == "lifecycle.state.changed"]


async def test_every_reply_says_the_state_of_the_last_change_heard_before_it(tmp_path: Path) -> None:
    config = service_config(tmp_path / "root", prefix=unique_prefix("reply-state"))
    async with service_in_process(config) as svc, probe(svc.topics) as p:
        await p.ready()
        for round_ in range(3):
            for action, ends_in in (("install", "running"), ("status", None), ("reset", "idle"), ("status", None)):
                request_id = f"{action}-{round_}-{ends_in}"
                correlation = await p.send(f'{{"id": "{request_id}", "action": "{action}"}}'.encode())
                found = await p.wait_for(lambda m, c=correlation: m.topic == p.reply_topic  # type: ignore[misc]
                                         and m.correlation == c)
                if ends_in is not None:
                    await p.wait_state_of(request_id, ends_in)
                reply = p.seen.index(found)
                heard = _changes_before(p.seen, svc.topics.events, reply)
                last = heard[-1]["to"] if heard else "idle"
                assert found.json()["state"] == last, (
                    f"{action}: the reply says {found.json()['state']!r}, the last change heard before it was "
                    f"into {last!r}")
