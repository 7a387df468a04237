"""Issue 8, R4 at the scale the issue measured: `FAULT_FUZZ` fuzzed requests (the file alone: 20,000;
`make test-faults`: 100,000) from tests/integration/test_hostile_requests.py's generator, plus its hand-made
crashers, sent over the real broker to a real `lifecycle serve` process in batches of 1,000. After every batch:
every request that named a response topic has its reply, a `status` is answered, `availability` never said
offline, the process lives; at the end nothing reached disk (no state file, no journal) and the process holds no
more descriptors than after the first batch. `-s` prints the figures (RSS reported, not asserted)."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from lifecycle_fakes import journal
from lifecycle_mqtt import Probe
from test_hostile_requests import (
    CRASHERS,
    STATE_FILE,
    assert_answers_status,
    fuzzed_requests,
    running_service,
)

FUZZ_COUNT = int(os.environ.get("FAULT_FUZZ", "20000"))
BATCH = 1000
WINDOW = 20


def _fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _send_all(p: Probe, payloads: list[bytes]) -> dict[bytes, bytes]:
    """Each payload with a response topic, `WINDOW` publishes awaiting their PUBACK at once (one at a time, the
    test measured its own round trips: ~35 requests a second)."""
    room = asyncio.Semaphore(WINDOW)
    sent: dict[bytes, bytes] = {}

    async def one(payload: bytes) -> None:
        async with room:
            sent[await p.send(payload)] = payload

    await asyncio.gather(*(one(payload) for payload in payloads))
    return sent


async def test_fuzzed_requests_by_the_thousand_are_all_answered_and_change_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    rng = random.Random(20261203)
    crashers = [payload for _, payload, _, _ in CRASHERS]
    started_s = time.monotonic()
    async with running_service(tmp_path, root) as (svc, p):
        pid = svc.proc.pid
        p.client.pending_calls_threshold = WINDOW + 10
        fds_first = rss_first = 0
        sent_total = 0
        for batch in range(max(1, FUZZ_COUNT // BATCH)):
            payloads = [*list(fuzzed_requests(rng, BATCH - len(crashers))), *crashers]
            sent = await _send_all(p, payloads)
            sent_total += len(sent)
            await assert_answers_status(p, svc, f"fuzzed batch {batch + 1}")
            replies = {m.correlation for m in p.seen if m.topic == p.reply_topic}
            unanswered = [payload[:80] for c, payload in sent.items() if c not in replies]
            assert unanswered == [], f"batch {batch + 1}: {len(unanswered)} unanswered, e.g. {unanswered[:3]}"
            offline = [m.payload for m in p.seen if m.topic == p.topics.availability and m.payload != b"online"]
            assert offline == [], f"batch {batch + 1}: availability said {offline[:3]}"
            assert svc.proc.poll() is None, svc.log()[-3000:]
            p.seen.clear()  # the probe's lookups scan what it holds: keep each batch's own
            if batch == 0:
                fds_first, rss_first = _fds(pid), _rss_kib(pid)
        fds_last, rss_last = _fds(pid), _rss_kib(pid)
        assert not (root / STATE_FILE).exists() and journal(root) == []
        assert fds_last <= fds_first, f"descriptors grew: {fds_first} after the first batch, {fds_last} at the end"
        elapsed_s = time.monotonic() - started_s
        print(f"\n{sent_total} fuzzed requests in {elapsed_s:.0f} s ({sent_total / elapsed_s:.0f}/s), all answered; "
              f"fds {fds_first} -> {fds_last}; RSS {rss_first} -> {rss_last} KiB")
