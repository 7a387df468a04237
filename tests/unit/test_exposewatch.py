"""The exposure watch with a real engine (test steps) and a scripted ServicesApi: a 410 Gone lists again, the
watch stops outside `running` and the message is cleared on reset; what is published is built and numbered as
the contract says (conflicts on both, seq growing across restarts). The real API server's side is covered by
tests/integration/test_kube_adapter.py and tests/e2e/test_exposures_over_mqtt.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lifecycle_fakes import eventually, fake_plan, fake_reset, make_config, null_ports

from lifecycle.bus import Bus, Subscription
from lifecycle.cli_render import exposure_text
from lifecycle.engine import Engine
from lifecycle.exposewatch import ExposureWatch
from lifecycle.exposures import Exposure, ExposureSet
from lifecycle.exposurestate import PublishedExposures, changes, exposures_from_services, skipped_ports
from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.ports import KubeApiError, ServicesApi
from lifecycle.protocol import Event, EventType
from lifecycle.service import state_file

NODE_IP = "192.0.2.10"


def lb(name: str, port: int, node_port: int, *, namespace: str = "default", protocol: str = "TCP") -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "resourceVersion": "1"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": port, "protocol": protocol, "nodePort": node_port}]},
            "status": {"loadBalancer": {}}}


def test_a_port_two_services_ask_for_is_a_conflict_on_both_and_other_kinds_are_left_out() -> None:
    services = [lb("web", 8080, 31000), lb("other", 8080, 31001, namespace="apps"),
                lb("dns", 53, 30053, protocol="UDP"), lb("sctp", 9, 30009, protocol="SCTP"),
                {"metadata": {"namespace": "default", "name": "plain"}, "spec": {"type": "ClusterIP", "ports": [
                    {"port": 80, "protocol": "TCP"}]}},
                {"metadata": {"namespace": "default", "name": "no-node-port"}, "spec": {
                    "type": "LoadBalancer", "allocateLoadBalancerNodePorts": False, "ports": [{"port": 81}]}}]
    found = {e.name: e for e in exposures_from_services(services, node_ip=NODE_IP)}
    assert set(found) == {"default/web", "apps/other", "default/dns"}
    assert found["default/web"].conflict == "TCP port 8080 is also asked for by apps/other"
    assert found["apps/other"].conflict == "TCP port 8080 is also asked for by default/web"
    assert found["default/dns"] == Exposure("default", "dns", 53, "UDP", NODE_IP, 30053)


def test_each_port_left_out_is_named_with_its_reason() -> None:
    services = [lb("web", 8080, 31000), lb("sctp", 9, 30009, protocol="SCTP"),
                {"metadata": {"namespace": "apps", "name": "no-node-port"}, "spec": {
                    "type": "LoadBalancer", "allocateLoadBalancerNodePorts": False, "ports": [{"port": 81}]}},
                {"metadata": {"namespace": "default", "name": "plain"}, "spec": {"type": "ClusterIP", "ports": [
                    {"port": 80, "protocol": "SCTP"}]}}]
    skipped = skipped_ports(services)
    assert [(s.namespace, s.service, s.port, s.protocol) for s in skipped] == [
        ("default", "sctp", 9, "SCTP"), ("apps", "no-node-port", 81, "TCP")]
    assert "TCP and UDP only" in skipped[0].reason
    assert "allocateLoadBalancerNodePorts" in skipped[1].reason
    assert exposure_text("skipped", skipped[0].to_json()).startswith("  not exposed: default/sctp port 9/SCTP: ")


def test_changes_name_what_appeared_left_and_whose_conflict_moved() -> None:
    a = Exposure("default", "a", 80, "TCP", NODE_IP, 30080)
    b = Exposure("default", "b", 81, "TCP", NODE_IP, 30081)
    a_conflict = replace(a, conflict="TCP port 80 is also asked for by default/c")
    assert [(c.kind, c.exposure.service) for c in changes([a], [a_conflict, b])] == [("conflict", "a"), ("added", "b")]
    assert [(c.kind, c.exposure.node_port) for c in changes([a], [replace(a, node_port=30999)])] == [
        ("removed", 30080), ("added", 30999)]


def test_seq_only_grows_across_restarts_and_resets_and_a_torn_file_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "exposures.json"
    one = (Exposure("default", "a", 80, "TCP", NODE_IP, 30080),)
    published = PublishedExposures(path, host="localhost")
    first, _ = published.update(())
    second, found = published.update(one)
    assert first is not None and second is not None and (first.seq, second.seq) == (1, 2)
    assert [c.kind for c in found] == ["added"]
    assert published.update(one) == (None, [])  # nothing new: nothing to send
    again = PublishedExposures(path, host="localhost")  # a restart: the same set goes out once more, same seq
    assert again.update(one) == (ExposureSet(seq=2, host="localhost", exposures=one), [])
    assert [c.kind for c in again.clear()] == ["removed"]
    after_reset, _ = PublishedExposures(path, host="localhost").update(())
    assert after_reset is not None and after_reset.seq == 3
    path.write_text("{torn")
    assert PublishedExposures(path, host="localhost").seq == 0


class ScriptedServices:
    """A ServicesApi whose Services are a dict; each watch plays the next script entry (an error to raise, or
    events to yield, then it waits until the test pushes more)."""

    def __init__(self, services: Sequence[dict[str, Any]]) -> None:
        self.services = {s["metadata"]["name"]: s for s in services}
        self.lists = 0
        self.watches: list[str] = []
        self.script: list[KubeApiError | None] = []
        self.pushed: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.ingress: dict[str, list[dict[str, str]]] = {}

    async def list_services(self) -> tuple[list[dict[str, Any]], str]:
        self.lists += 1
        return list(self.services.values()), str(100 + self.lists)

    async def watch_services(self, *, resource_version: str, timeout_s: float) -> AsyncGenerator[dict[str, Any], None]:
        self.watches.append(resource_version)
        step = self.script.pop(0) if self.script else None
        if step is not None:
            raise step
        while True:
            yield await self.pushed.get()

    async def set_load_balancer_ingress(self, namespace: str, name: str,
                                        ingress: Sequence[Mapping[str, str]]) -> dict[str, Any]:
        self.ingress[name] = [dict(i) for i in ingress]
        svc = self.services[name]
        svc["status"] = {"loadBalancer": {"ingress": self.ingress[name]}}
        return svc


class ScriptedFactory:
    def __init__(self, api: ScriptedServices) -> None:
        self.api = api
        self.connects = 0

    @contextlib.asynccontextmanager
    async def connect_services(self, kubeconfig: Path) -> AsyncIterator[ServicesApi]:
        self.connects += 1
        yield self.api


def _engine(tmp_path: Path) -> tuple[Engine, Bus, Subscription]:
    """An engine with test steps on the node address NODE_IP, its bus, and a subscription that sees everything."""
    config = make_config(tmp_path)
    config = replace(config, kubernetes=replace(config.kubernetes, node_ip=NODE_IP))
    bus = Bus()
    items = bus.subscribe("test")
    engine = Engine(config=config, paths=HostPaths(tmp_path), ports=null_ports(), plan=fake_plan(), reset=fake_reset,
                    store=state_file(HostPaths(tmp_path)), bus=bus)
    return engine, bus, items


async def test_a_410_lists_again_the_watch_stops_outside_running_and_a_reset_clears(tmp_path: Path) -> None:
    engine, bus, items = _engine(tmp_path)
    api = ScriptedServices([lb("web", 8080, 31000)])
    api.script = [KubeApiError("too old resource version", status=410, reason="Expired")]
    watch = ExposureWatch(engine=engine, bus=bus, services=ScriptedFactory(api), kubeconfig=tmp_path / "admin.conf",
                          host="localhost")
    task = asyncio.create_task(watch.run(), name="exposure-watch-under-test")
    try:
        await asyncio.sleep(0.05)
        assert api.lists == 0  # idle: nothing is watched
        await engine.install(request_id="up", version=None)
        await engine.wait_job()
        assert engine.state == State.RUNNING
        await eventually(lambda: len(api.watches) == 2)
        assert api.lists == 2 and api.watches == ["101", "102"]  # the 410 listed again at once, no backoff
        assert api.ingress == {"web": [{"hostname": "localhost"}]}

        api.services["web2"] = lb("web2", 8080, 31001)
        await api.pushed.put({"type": "ADDED", "object": api.services["web2"]})
        await eventually(lambda: api.ingress.get("web") == [])
        assert "web2" not in api.ingress  # both in conflict: the host forwards neither (web2 never had one)

        # web2 stops being a LoadBalancer: its exposure goes, web's conflict resolves, web gets its ingress back.
        api.services["web2"] = {**api.services["web2"], "spec": {"type": "ClusterIP", "ports": [{"port": 8080}]},
                                "status": {"loadBalancer": {"ingress": [{"hostname": "localhost"}]}}}
        await api.pushed.put({"type": "MODIFIED", "object": api.services["web2"]})
        await eventually(lambda: api.ingress.get("web") == [{"hostname": "localhost"}])
        assert api.ingress["web2"] == []  # a stale ingress of ours on a Service that is no LoadBalancer any more

        await engine.reset(request_id="wipe")
        await engine.wait_job()
        await asyncio.sleep(0.05)
        listed = api.lists
        published = []
        while len(items):
            item = items.pop()
            if isinstance(item, ExposureSet) or (
                    isinstance(item, Event) and item.type.value.startswith("lifecycle.exposure.")):
                published.append(item)
        sets = [p for p in published if isinstance(p, ExposureSet)]
        # The start in idle clears once (a kill may have kept the last clear from the broker), then the reset.
        assert [len(s.exposures) for s in sets] == [0, 1, 2, 1, 0]
        assert sets[0].seq is None and sets[-1].seq is None  # a clear: an empty retained payload
        kinds = [p.type for p in published if isinstance(p, Event)]
        assert kinds.count(EventType.EXPOSURE_ADDED) == 2 and kinds.count(EventType.EXPOSURE_CONFLICT) == 3
        assert kinds[-1] == EventType.EXPOSURE_REMOVED
        assert kinds.count(EventType.EXPOSURE_REMOVED) == 2  # web2 when it changed type, web on the reset
        await asyncio.sleep(0.1)
        assert api.lists == listed  # stopped
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_lifecycle_watch_prints_one_line_per_exposure_event() -> None:
    data = Exposure("default", "web", 8080, "TCP", NODE_IP, 31000).to_json()
    assert exposure_text("added", data) == "  exposed default/web port 8080/TCP -> node 192.0.2.10:31000"
    assert exposure_text("removed", data) == "  no longer exposed: default/web port 8080/TCP"
    assert exposure_text("conflict", data) == "  conflict resolved: default/web port 8080/TCP is forwarded"
    conflicted = {**data, "conflict": "TCP port 8080 is also asked for by apps/other"}
    assert exposure_text("added", conflicted).endswith("(not forwarded: TCP port 8080 is also asked for by apps/other)")
    assert exposure_text("conflict", conflicted) == (
        "  conflict on default/web port 8080/TCP: TCP port 8080 is also asked for by apps/other")


async def test_a_port_that_cannot_be_forwarded_is_told_once_as_skipped(tmp_path: Path) -> None:
    engine, bus, items = _engine(tmp_path)
    api = ScriptedServices([lb("sctp", 9, 30009, protocol="SCTP")])
    watch = ExposureWatch(engine=engine, bus=bus, services=ScriptedFactory(api), kubeconfig=tmp_path / "admin.conf",
                          host="localhost")
    task = asyncio.create_task(watch.run(), name="exposure-watch-under-test")

    seen: list[dict[str, Any]] = []

    def skipped() -> list[dict[str, Any]]:
        while len(items):
            item = items.pop()
            if isinstance(item, Event) and item.type == EventType.EXPOSURE_SKIPPED:
                seen.append(item.data)
        return seen

    try:
        await engine.install(request_id="up", version=None)
        await engine.wait_job()
        await eventually(lambda: len(skipped()) == 1)
        assert {k: skipped()[0][k] for k in ("namespace", "service", "port", "protocol")} == {
            "namespace": "default", "service": "sctp", "port": 9, "protocol": "SCTP"}
        api.services["web"] = lb("web", 8080, 31000)
        await api.pushed.put({"type": "ADDED", "object": api.services["web"]})
        await eventually(lambda: api.ingress.get("web") == [{"hostname": "localhost"}])
        assert len(skipped()) == 1  # told once, not at every change of another Service
        assert "sctp" not in api.ingress  # nothing forwarded: EXTERNAL-IP stays <pending>
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
