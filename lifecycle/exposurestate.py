"""What the service publishes on `<prefix>/<node>/exposures`: built from the LoadBalancer Services, checked
with the contract's own parser (lifecycle.exposures), compared with the last message for the events. Leaves
`<state_dir>/exposures.json`: the last `seq` and set published, so `seq` only grows across restarts and a
restart reports what changed while it was down. No MQTT, no Kubernetes client.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lifecycle.atomicfile import write_atomic
from lifecycle.exposures import PROTOCOLS, Exposure, ExposureSet, IpProtocol, parse_exposures
from lifecycle.protocol import dumps

LOAD_BALANCER = "LoadBalancer"


def is_load_balancer(service: Mapping[str, Any]) -> bool:
    return (service.get("spec") or {}).get("type") == LOAD_BALANCER


@dataclass(frozen=True)
class SkippedPort:
    """A port of a LoadBalancer Service that the host cannot be given, and why (event
    `lifecycle.exposure.skipped`): without it a user would see `<pending>` under EXTERNAL-IP and no reason."""

    namespace: str
    service: str
    port: int
    protocol: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "service": self.service, "port": self.port, "protocol": self.protocol,
                "reason": self.reason}


def skipped_ports(services: Iterable[Mapping[str, Any]]) -> tuple[SkippedPort, ...]:
    """The LoadBalancer ports `exposures_from_services` leaves out, each with the reason it is left out."""
    out: list[SkippedPort] = []
    for svc in services:
        if not is_load_balancer(svc):
            continue
        meta = svc.get("metadata") or {}
        for port in (svc.get("spec") or {}).get("ports") or []:
            reason = _unforwardable(port)
            if reason is not None:
                out.append(SkippedPort(str(meta.get("namespace", "default")), str(meta.get("name")),
                                       int(port.get("port") or 0), str(port.get("protocol", "TCP")), reason))
    return tuple(out)


def _unforwardable(port: Mapping[str, Any]) -> str | None:
    protocol = port.get("protocol", "TCP")
    if protocol not in PROTOCOLS:
        return f"{protocol} cannot be forwarded by a host listener (TCP and UDP only)"
    if not isinstance(port.get("nodePort"), int):
        return "no node port (spec.allocateLoadBalancerNodePorts is false): nothing on the node to forward to"
    return None


def exposures_from_services(services: Iterable[Mapping[str, Any]], *, node_ip: str) -> tuple[Exposure, ...]:
    """One entry per port of each LoadBalancer Service that has a node port, in a stable order; a (protocol,
    port) asked for by more than one Service is a conflict on every entry asking for it."""
    found: list[Exposure] = []
    for svc in services:
        if not is_load_balancer(svc):
            continue
        meta = svc.get("metadata") or {}
        for port in (svc.get("spec") or {}).get("ports") or []:
            if _unforwardable(port) is not None:  # reported by `skipped_ports`
                continue
            protocol = port.get("protocol", "TCP")
            found.append(Exposure(namespace=str(meta.get("namespace", "default")), service=str(meta.get("name")),
                                  port=int(port["port"]), protocol=_protocol(protocol), node_ip=node_ip,
                                  node_port=int(port["nodePort"])))
    by_key: dict[tuple[IpProtocol, int], list[Exposure]] = {}
    for e in found:
        by_key.setdefault(e.key, []).append(e)
    out: list[Exposure] = []
    for (protocol, port), claims in by_key.items():
        for e in claims:
            others = sorted({o.name for o in claims if o.name != e.name})
            if others:
                e = replace(e, conflict=f"{protocol} port {port} is also asked for by {', '.join(others)}")
            out.append(e)
    return tuple(sorted(out, key=lambda e: (e.protocol, e.port, e.namespace, e.service)))


def _protocol(text: str) -> IpProtocol:
    return "UDP" if text == "UDP" else "TCP"


@dataclass(frozen=True)
class Change:
    """One entry of an exposures message that appeared, disappeared or whose conflict changed."""

    kind: str  # "added", "removed", "conflict"
    exposure: Exposure


def _ident(e: Exposure) -> tuple[str, str, IpProtocol, int, str, int]:
    return (e.namespace, e.service, e.protocol, e.port, e.node_ip, e.node_port)


def changes(before: Iterable[Exposure], after: Iterable[Exposure]) -> list[Change]:
    """`added` for a new entry (a new node port or node IP makes it new), `removed` for one gone, `conflict`
    for an entry born conflicted or whose conflict text changed (to null: resolved)."""
    old = {_ident(e): e for e in before}
    new = {_ident(e): e for e in after}
    out = [Change("removed", e) for k, e in old.items() if k not in new]
    for k, e in new.items():
        if k not in old:
            out.append(Change("added", e))
            if e.conflict is not None:
                out.append(Change("conflict", e))
        elif old[k].conflict != e.conflict:
            out.append(Change("conflict", e))
    return out


class PublishedExposures:
    """The last message published and its `seq`, kept in `path` (written before the message goes out)."""

    def __init__(self, path: Path, *, host: str) -> None:
        self._path = path
        self.host = host
        self.seq, self.current = self._load()
        self._sent = False  # nothing published by this process yet: the first update goes out even if unchanged

    def _load(self) -> tuple[int, ExposureSet | None]:
        try:
            raw = json.loads(self._path.read_bytes())
            seq = int(raw["seq"])
            last = raw.get("published")
            return seq, (parse_exposures(dumps(last)) if isinstance(last, dict) else None)
        except FileNotFoundError:
            return 0, None
        except (ValueError, KeyError, TypeError):
            return 0, None  # a torn or foreign file: seq starts over, which a host sees as a new publisher

    def update(self, exposures: tuple[Exposure, ...]) -> tuple[ExposureSet | None, list[Change]]:
        """The next message and the changes since the last one, saved; None when the broker already has it (the
        first update after a start is sent again with its seq, in case the broker lost it)."""
        before = self.current.exposures if self.current is not None else ()
        found = changes(before, exposures)
        unchanged = self.current is not None and self.current.host == self.host and before == exposures
        if unchanged and self._sent:
            return None, []
        self._sent = True
        if not unchanged:
            self.seq += 1
        message = ExposureSet(seq=self.seq, host=self.host, exposures=exposures)
        parse_exposures(dumps(message.to_json()))  # the contract's own check: a bug here must not reach a host
        self.current = message
        self._save()
        return message, found

    def clear(self) -> list[Change]:
        """Nothing exposed any more (reset): the changes; `seq` is kept so that it still only grows."""
        found = changes(self.current.exposures if self.current is not None else (), ())
        if self.current is not None:
            self.current = None
            self._save()
        return found

    def _save(self) -> None:
        doc = {"seq": self.seq, "published": self.current.to_json() if self.current is not None else None}
        write_atomic(self._path, dumps(doc), 0o644)
