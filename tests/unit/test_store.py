"""The persisted snapshot: atomic replacement, survives restarts (and SIGKILL mid-write), sequence continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lifecycle_fakes import fake_plan, fake_reset, make_config, null_ports

from lifecycle.bus import Bus
from lifecycle.engine import Engine
from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.protocol import ErrorInfo, Event
from lifecycle.service import state_file
from lifecycle.step import ClusterParams
from lifecycle.store import Snapshot, Store, StoreError

STATES = {s.value for s in State}


def _store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.json", known_states=STATES)


def test_a_snapshot_survives_a_new_store_instance(tmp_path: Path) -> None:
    snap = Snapshot(state="failed", since=123.5, seq=42, request_id="r1",
                    cluster=ClusterParams("v1.31.4", 6443, 10248), step=2,
                    error=ErrorInfo("pull_failed", "no", True, {"image": "x"}))
    _store(tmp_path).save(snap)
    assert _store(tmp_path).load() == snap
    on_disk = json.loads((tmp_path / "state.json").read_text())
    assert on_disk["kubernetes_version"] == "v1.31.4" and on_disk["seq"] == 42


def test_the_node_ip_of_an_install_is_kept_and_absent_in_older_state(tmp_path: Path) -> None:
    snap = Snapshot(state="running", since=1.0, seq=3, cluster=ClusterParams("v1.31.4", 6443, 10248,
                                                                             node_ip="10.0.2.15"))
    _store(tmp_path).save(snap)
    loaded = _store(tmp_path).load()
    assert loaded is not None and loaded.cluster is not None and loaded.cluster.node_ip == "10.0.2.15"
    raw = json.loads((tmp_path / "state.json").read_text())
    raw["cluster"].pop("node_ip")  # state written before the key existed
    (tmp_path / "state.json").write_text(json.dumps(raw))
    old = _store(tmp_path).load()
    assert old is not None and old.cluster is not None and old.cluster.node_ip == ""  # the config's then applies


def test_nothing_saved_loads_as_none(tmp_path: Path) -> None:
    assert _store(tmp_path).load() is None


def test_save_replaces_the_file_instead_of_rewriting_it(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.save(Snapshot(state="idle", since=1.0, seq=1))
    inode = (tmp_path / "state.json").stat().st_ino
    store.save(Snapshot(state="certs", since=2.0, seq=2))
    assert (tmp_path / "state.json").stat().st_ino != inode  # renamed over: readers never see half a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq", "state.json"]  # no temp file left


def test_sequence_numbers_between_state_changes_are_kept(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.save(Snapshot(state="images", since=1.0, seq=5))
    for seq in range(6, 40):
        store.save_seq(seq)
    store.unlock()
    loaded = _store(tmp_path).load()
    assert loaded is not None and (loaded.state, loaded.seq) == ("images", 39)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{", "not a valid state file"),
        ('{"format": 1, "state": "exploded", "since": 1, "seq": 1}', "unknown state"),
        ('{"format": 99, "state": "idle", "since": 1, "seq": 1}', "unknown format"),
        ('{"format": 1, "state": "idle", "since": 1, "seq": "7"}', "'seq'"),
    ],
)
def test_a_bad_state_file_is_an_error_naming_it_and_is_left_alone(tmp_path: Path, content: str, why: str) -> None:
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(StoreError) as info:
        _store(tmp_path).load()
    assert str(tmp_path / "state.json") in str(info.value) and why in str(info.value)
    assert (tmp_path / "state.json").read_text() == content


def test_one_service_per_root(tmp_path: Path) -> None:
    first = _store(tmp_path)
    first.lock()
    with pytest.raises(StoreError, match=f"pid {os.getpid()}"):
        _store(tmp_path).lock()
    first.unlock()
    _store(tmp_path).lock()


WRITER = """
import sys, time
from pathlib import Path
from lifecycle.store import Snapshot, Store
store = Store(Path(sys.argv[1]), known_states={"idle", "images"})
seq = 0
while True:
    seq += 1
    state = "images" if seq % 2 else "idle"
    store.save(Snapshot(state=state, since=time.time(), seq=seq, request_id="x" * (seq % 500)))
"""


def test_sigkill_while_saving_never_leaves_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    for delay_s in (0.05, 0.11, 0.17, 0.23):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        started = path.stat().st_mtime if path.exists() else 0.0
        deadline = time.monotonic() + 10
        while (not path.exists() or path.stat().st_mtime == started) and time.monotonic() < deadline:
            time.sleep(0.01)  # until this writer is saving
        time.sleep(delay_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        snap = _store(tmp_path).load()
        on_disk = json.loads(path.read_text())  # whole: the old or the new version, never a mix
        assert on_disk["request_id"] == "x" * (on_disk["seq"] % 500)
        assert snap is not None and snap.seq >= on_disk["seq"] > 0  # `seq` may be one ahead of state.json


async def test_event_sequence_continues_across_engine_restarts(tmp_path: Path) -> None:
    seqs: list[int] = []
    for request in ("r1", "z1", "r2"):
        bus = Bus()
        sub = bus.subscribe("test")
        engine = Engine(config=make_config(tmp_path), paths=HostPaths(tmp_path), ports=null_ports(), plan=fake_plan(),
                        reset=fake_reset, store=state_file(HostPaths(tmp_path)), bus=bus)
        await engine.start()
        if request.startswith("r"):
            await engine.install(request_id=request, version=None)
        else:
            await engine.reset(request_id=request)
        await engine.wait_job()
        while len(sub):
            item = sub.pop()
            if isinstance(item, Event):
                seqs.append(item.seq)
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 15
