"""Leaves the certs step would re-issue on a node with a cluster go through the renewal routine: which leaves
count (`leaves_to_renew`, on a real PKI), and the engine's routing with fake steps (after a restart in `running`,
on a resume from `failed`, when renewal is impossible or fails)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lifecycle_fakes import fake_dir, fake_plan, fake_reset, make_config, null_ports

from lifecycle.bus import Bus, Subscription
from lifecycle.engine import Engine
from lifecycle.errors import PermanentError, TemporaryError
from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.pki import plan_pki, write_files
from lifecycle.pki_specs import PkiParams
from lifecycle.protocol import Event, EventType
from lifecycle.renewal import leaves_to_renew
from lifecycle.service import state_file
from lifecycle.step import StepContext

PARAMS = PkiParams(node_name="unit", node_ip="127.0.0.1", endpoint_name="localhost", api_port=6443,
                   cert_validity_days=10.0)


def _pki(root: Path, *, issued: datetime) -> HostPaths:
    paths = HostPaths(root)
    files, _ = plan_pki({}, PARAMS, now=issued)
    write_files(files, pki_dir=paths.pki_dir, kubeconfig_dir=paths.kubernetes_dir)
    return paths


def _cluster(paths: HostPaths) -> None:
    paths.kubelet_config.parent.mkdir(parents=True, exist_ok=True)
    paths.kubelet_config.write_text("kind: KubeletConfiguration\n")
    paths.manifests_dir.mkdir(parents=True, exist_ok=True)
    (paths.manifests_dir / "kube-apiserver.yaml").write_text("kind: Pod\n")


def test_leaves_within_the_margin_on_a_cluster_are_to_renew(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    paths = _pki(tmp_path, issued=now - timedelta(days=9.5))  # 10-day leaves: within the 1-day margin
    assert leaves_to_renew(paths, PARAMS, now=now) == []  # no kubelet config, no manifests: the certs step's work
    _cluster(paths)
    due = leaves_to_renew(paths, PARAMS, now=now)
    assert {"apiserver.crt", "etcd/server.crt", "admin.conf", "kubelet.conf"} <= set(due)
    assert not {"ca.crt", "etcd/ca.crt", "front-proxy-ca.crt", "sa.key"} & set(due)
    assert leaves_to_renew(paths, PARAMS, now=now - timedelta(days=2)) == []  # two days earlier: all valid


def test_a_wrong_san_counts_and_a_ca_problem_or_a_missing_ca_key_leaves_it_to_the_certs_step(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    paths = _pki(tmp_path, issued=now)
    _cluster(paths)
    assert leaves_to_renew(paths, replace(PARAMS, extra_sans=("api.example.test",)), now=now) == ["apiserver.crt"]
    (paths.pki_dir / "front-proxy-ca.key").unlink()  # external CA: a renewal cannot issue from it
    assert leaves_to_renew(paths, PARAMS, now=now + timedelta(days=9.5)) == []
    (paths.pki_dir / "etcd" / "ca.crt").write_text("garbage")  # a CA to make anew: not a renewal
    assert leaves_to_renew(paths, PARAMS, now=now) == []


@dataclass
class Renewal:
    """Stands for states.renewing: `due` answers renewal_due, the routine marks the fake certs step done."""

    due: list[str] = field(default_factory=lambda: ["apiserver.crt", "kubelet.conf"])
    behaviour: str = "ok"  # ok | unchanged | changed
    calls: list[str] = field(default_factory=list)

    async def renewal_due(self, ctx: StepContext) -> list[str]:
        return list(self.due)

    async def renew(self, ctx: StepContext) -> list[str]:
        self.calls.append(str(ctx.request_id))
        ctx.progress("renewed apiserver.crt", current=1, total=1, unit="files")
        if self.behaviour == "unchanged":
            raise PermanentError("ca.key: missing", code="renewal_impossible", details={"node_changed": False})
        if self.behaviour == "changed":
            raise TemporaryError("kubelet not healthy", code="kubelet_unhealthy")
        (fake_dir(ctx.paths.root) / "certs.done").touch()
        return ["apiserver.crt", "/var/lib/kubelet/pki/kubelet-client-current.pem"]


def _engine(root: Path, renewal: Renewal) -> tuple[Engine, Subscription]:
    bus = Bus()
    sub = bus.subscribe("test")
    engine = Engine(config=make_config(root), paths=HostPaths(root), ports=null_ports(), plan=fake_plan(),
                    reset=fake_reset, store=state_file(HostPaths(root)), bus=bus, renew=renewal.renew,
                    renewal_due=renewal.renewal_due)
    return engine, sub


def _events(sub: Subscription) -> list[Event]:
    out: list[Event] = []
    while len(sub):
        item = sub.pop()
        if isinstance(item, Event):
            out.append(item)
    return out


def _journal(root: Path) -> list[str]:
    return (fake_dir(root) / "journal").read_text().splitlines()


async def _installed(root: Path) -> None:
    """A running cluster whose service then stopped; the certs step's outcome no longer holds (leaves expiring)."""
    engine, _ = _engine(root, Renewal(due=[]))
    await engine.install(request_id="i1", version=None)
    await engine.wait_job()
    assert engine.state == State.RUNNING
    await engine.shutdown()
    (fake_dir(root) / "certs.done").unlink()


async def test_a_restart_in_running_renews_instead_of_rewriting_the_certs(tmp_path: Path) -> None:
    await _installed(tmp_path)
    renewal = Renewal()
    engine, sub = _engine(tmp_path, renewal)
    await engine.start()
    await engine.wait_job()
    assert engine.state == State.RUNNING and renewal.calls == ["i1"]
    assert "run certs 1" not in _journal(tmp_path)[-3:]  # the plain certs step did not run after the install
    events = _events(sub)
    renewed = [e.data for e in events if e.type == EventType.CERTS_RENEWED]
    assert len(renewed) == 1 and renewed[0]["request_id"] == "i1"
    assert "/var/lib/kubelet/pki/kubelet-client-current.pem" in renewed[0]["files"]
    progress = [e.data["message"] for e in events if e.type == EventType.STEP_PROGRESS and e.data["state"] == "certs"]
    assert progress[0] == "after a restart: certs no longer holds; repairing from here"  # the boot says why
    assert progress[1].startswith("renewing certificates of the running cluster (apiserver.crt, kubelet.conf")
    assert progress[2:4] == ["renewed apiserver.crt", "already done"]
    changes = [(e.data["from"], e.data["to"]) for e in events if e.type == EventType.STATE_CHANGED]
    assert changes[0] == ("running", "certs") and changes[-1] == ("addons", "running")
    await engine.shutdown()


async def test_nothing_due_or_renewal_impossible_runs_the_plain_certs_step(tmp_path: Path) -> None:
    await _installed(tmp_path)
    for renewal in (Renewal(due=[]), Renewal(behaviour="unchanged")):
        engine, sub = _engine(tmp_path, renewal)
        await engine.start()
        await engine.wait_job()
        assert engine.state == State.RUNNING and engine.status().error is None
        assert _journal(tmp_path)[-1].startswith("run certs")
        assert not [e for e in _events(sub) if e.type == EventType.CERTS_RENEWED]
        await engine.shutdown()
        (fake_dir(tmp_path) / "certs.done").unlink()
    assert renewal.calls == ["i1"]


async def test_a_failed_renewal_fails_the_certs_step_and_install_renews_again(tmp_path: Path) -> None:
    await _installed(tmp_path)
    renewal = Renewal(behaviour="changed")
    engine, _ = _engine(tmp_path, renewal)
    await engine.start()
    await engine.wait_job()
    status = engine.status()
    assert (status.state, status.step, status.error.code if status.error else None) == (
        "failed", 2, "kubelet_unhealthy")
    assert not _journal(tmp_path)[-1].startswith("run certs")
    renewal.behaviour = "ok"
    await engine.install(request_id="i2", version=None)  # a resume from `failed` takes the same route
    await asyncio.wait_for(engine.wait_job(), timeout=10)
    assert engine.state == State.RUNNING and renewal.calls == ["i1", "i2"]
    await engine.shutdown()
