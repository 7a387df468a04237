"""The `exposures` message as data: what the service publishes (retained, `<prefix>/<node>/exposures`) and the host
side (`lifecycle.forward`) reads. One parser for both sides, checked against docs/schemas/exposures.schema.json by
the tests. No I/O.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Literal, cast

IpProtocol = Literal["TCP", "UDP"]
PROTOCOLS: tuple[IpProtocol, ...] = ("TCP", "UDP")
MAX_PAYLOAD_BYTES = 1024 * 1024  # thousands of Service ports; more is not a message from our service


class ExposuresError(ValueError):
    """The message does not follow the schema; the reason names the field."""


@dataclass(frozen=True)
class Exposure:
    namespace: str
    service: str
    port: int  # opened on the host
    protocol: IpProtocol
    node_ip: str
    node_port: int
    conflict: str | None = None

    @property
    def key(self) -> tuple[IpProtocol, int]:
        """What a host listener is: two exposures with the same key cannot both be open."""
        return (self.protocol, self.port)

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.service}"

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "service": self.service, "port": self.port, "protocol": self.protocol,
                "node_ip": self.node_ip, "node_port": self.node_port, "conflict": self.conflict}


@dataclass(frozen=True)
class ExposureSet:
    seq: int | None  # None: the retained message was cleared (no exposures)
    host: str
    exposures: tuple[Exposure, ...]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "host": self.host, "exposures": [e.to_json() for e in self.exposures]}


CLEARED = ExposureSet(seq=None, host="localhost", exposures=())


def parse_exposures(payload: bytes) -> ExposureSet:
    """The message, checked as the schema says (and (protocol, port) unique among unconflicted entries)."""
    if not payload:
        return CLEARED  # an empty retained payload deletes the message: nothing to expose
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ExposuresError(f"{len(payload)} bytes, more than {MAX_PAYLOAD_BYTES}")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ExposuresError("not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise ExposuresError("not a JSON object")
    seq = _int(doc, "seq", "", low=0, high=None)
    host = doc.get("host")
    if not isinstance(host, str) or not host:
        raise ExposuresError("host: expected a non-empty string")
    entries = doc.get("exposures")
    if not isinstance(entries, list):
        raise ExposuresError("exposures: expected a list")
    exposures = tuple(_exposure(entry, f"exposures[{i}].") for i, entry in enumerate(entries))
    seen: dict[tuple[IpProtocol, int], str] = {}
    for e in exposures:
        if e.conflict is None and e.key in seen:
            raise ExposuresError(f"{e.protocol} port {e.port} is given to {seen[e.key]} and {e.name} "
                                 "without a conflict")
        if e.conflict is None:
            seen[e.key] = e.name
    return ExposureSet(seq=seq, host=host, exposures=exposures)


def _exposure(entry: object, where: str) -> Exposure:
    if not isinstance(entry, dict):
        raise ExposuresError(f"{where[:-1]}: expected an object")
    names = {}
    for field in ("namespace", "service"):
        value = entry.get(field)
        if not isinstance(value, str) or not value:
            raise ExposuresError(f"{where}{field}: expected a non-empty string")
        names[field] = value
    protocol = entry.get("protocol")
    if protocol not in PROTOCOLS:
        raise ExposuresError(f"{where}protocol: expected 'TCP' or 'UDP', got {protocol!r}")
    node_ip = entry.get("node_ip")
    if not isinstance(node_ip, str) or not _is_ip(node_ip):  # a host name too: nothing to resolve on the host
        raise ExposuresError(f"{where}node_ip: expected an IP address, got {node_ip!r}")
    conflict = entry.get("conflict", ...)
    if conflict is ... or not (conflict is None or isinstance(conflict, str)):
        raise ExposuresError(f"{where}conflict: expected null or a string")
    return Exposure(
        namespace=names["namespace"], service=names["service"], port=_int(entry, "port", where),
        protocol=cast(IpProtocol, protocol), node_ip=str(node_ip), node_port=_int(entry, "node_port", where),
        conflict=conflict,
    )


def _int(doc: dict[str, Any], field: str, where: str, *, low: int = 1, high: int | None = 65535) -> int:
    value = doc.get(field)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)  # JSON Schema's "integer" includes 8.0; the schema and this parser agree
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ExposuresError(f"{where}{field}: expected an integer {bounds}, got {value!r}")
    return value


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
