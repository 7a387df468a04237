"""`diagnose` over a real broker (issue 11, part 5): a bundle larger than one message arrives in numbered chunks on
the requester's reply topic only, each under 256 KiB, and the CLI puts them together into the `.tar.gz`."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest
from lifecycle_mqtt import probe, service_config, service_in_process, unique_prefix

from lifecycle.diagnose import reassemble
from lifecycle.paths import HostPaths

LIFECYCLE = Path(sys.executable).parent / "lifecycle"


@pytest.fixture(autouse=True)
def _broker(mqtt_broker: tuple[str, int]) -> None:
    """Every test here needs the shared broker; fail with the command that starts it."""


async def test_a_large_bundle_comes_in_checksummed_chunks_to_the_requester_only_and_the_cli_joins_them(
    tmp_path: Path,
) -> None:
    paths = HostPaths(tmp_path / "root")
    paths.log_dir.mkdir(parents=True)
    # Hex of random bytes compresses to about half: a 512 KiB log tail makes a bundle of two chunks or more.
    kubelet_log = "".join(f"{os.urandom(48).hex()}\n" for _ in range(6000))
    (paths.log_dir / "kubelet.log").write_text(kubelet_log)
    prefix = unique_prefix("diag")
    async with service_in_process(service_config(paths.root, prefix=prefix)) as svc, probe(svc.topics) as p:
        await p.ready()
        correlation = await p.send(b'{"id": "d-1", "action": "diagnose"}')
        first = await p.wait_for(lambda m: m.topic == p.reply_topic and m.correlation == correlation, timeout_s=20)
        count = first.json()["chunk"]["count"]
        assert count >= 2, first.json()["note"]
        last = await p.wait_for(lambda m: m.topic == p.reply_topic and m.json()["chunk"]["index"] == count - 1,
                                timeout_s=20)
        replies = [m for m in p.seen if m.topic == p.reply_topic]
        assert replies[-1] is last
        assert all(len(m.payload) < 256 * 1024 and m.json()["ok"] and m.json()["id"] == "d-1" for m in replies)
        assert [m.json()["chunk"]["index"] for m in replies] == list(range(count))
        bundle = reassemble(m.json()["chunk"] for m in replies)
        with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
            log = next(m for m in tar.getmembers() if m.name.endswith("/kubelet.log"))
            assert tar.extractfile(log).read().decode() == kubelet_log[-512 * 1024:]  # type: ignore[union-attr]
        # Nothing of it on the node's shared topics (events, status, availability).
        assert not [m for m in p.seen if m.topic != p.reply_topic and b'"chunk"' in m.payload]

        out = tmp_path / "diag.tar.gz"
        cli = await asyncio.create_subprocess_exec(
            str(LIFECYCLE), "diagnose", "--broker", "mqtt://127.0.0.1:1883", "--prefix", prefix, "--node", "n1",
            "-o", str(out), stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(cli.communicate(), timeout=60)
        assert cli.returncode == 0, stderr.decode()
        assert f"{count} chunk(s), sha256 checked" in stderr.decode()
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        with tarfile.open(out) as tar:
            assert any(m.name.endswith("/kubelet.log") for m in tar.getmembers())
