"""ClusterIP and NodePort allocation for Services, from `--service-cluster-ip-range`."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

from simnode.apiserver.errors import invalid
from simnode.apiserver.resources import SERVICES
from simnode.apiserver.store import Store

NODE_PORT_RANGE = (30000, 32767)
_NEEDS_IP = ("ClusterIP", "NodePort", "LoadBalancer")


def parse_range(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The first network of a possibly dual-stack `a,b` range."""
    return ipaddress.ip_network(text.split(",")[0].strip(), strict=False)


def first_ip(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return str(network.network_address + 1)


class Allocator:
    def __init__(self, store: Store, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        self.store = store
        self.network = network

    def _used_ips(self, exclude: tuple[str, str]) -> set[str]:
        used = set()
        for svc in self.store.iter_resource(SERVICES.key):
            m = svc["metadata"]
            if (m.get("namespace", ""), m["name"]) == exclude:
                continue
            ip = (svc.get("spec") or {}).get("clusterIP")
            if ip and ip != "None":
                used.add(ip)
        return used

    def _used_ports(self, exclude: tuple[str, str]) -> set[int]:
        used = set()
        for svc in self.store.iter_resource(SERVICES.key):
            m = svc["metadata"]
            if (m.get("namespace", ""), m["name"]) != exclude:
                used |= {p.get("nodePort") for p in (svc.get("spec") or {}).get("ports") or [] if p.get("nodePort")}
        return used

    def assign(self, svc: dict[str, Any], old: dict[str, Any] | None) -> None:
        """Fill spec.clusterIP(s) and nodePorts; keeps what `old` had; rejects taken or out-of-range IPs."""
        spec = svc.get("spec")
        if not isinstance(spec, dict):
            return
        m = svc["metadata"]
        me = (m.get("namespace", ""), m["name"])
        old_spec = (old or {}).get("spec") or {}
        if spec.get("type", "ClusterIP") not in _NEEDS_IP:
            return
        if not spec.get("clusterIP") and old_spec.get("clusterIP"):
            spec["clusterIP"] = old_spec["clusterIP"]
        ip = spec.get("clusterIP")
        if ip and ip != "None" and ip != old_spec.get("clusterIP"):
            self._check_ip(ip, me)
        elif not ip:
            spec["clusterIP"] = self._pick_ip(me)
        spec["clusterIPs"] = [spec["clusterIP"]]
        if spec["clusterIP"] != "None":
            spec.setdefault("ipFamilies", ["IPv4" if self.network.version == 4 else "IPv6"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            self._node_ports(spec, old_spec, me)

    def _check_ip(self, ip: str, me: tuple[str, str]) -> None:
        name = me[1]
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            cause = ("spec.clusterIPs", f'Invalid value: ["{ip}"]: must be a valid IP')
            raise invalid(SERVICES, name, [cause]) from None
        if addr not in self.network:
            why = f"failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. " \
                  f"The range of valid IPs is {self.network}"
            raise invalid(SERVICES, name, [("spec.clusterIPs", f'Invalid value: ["{ip}"]: {why}')])
        if ip in self._used_ips(me):
            why = f"failed to allocate IP {ip}: provided IP is already allocated"
            raise invalid(SERVICES, name, [("spec.clusterIPs", f'Invalid value: ["{ip}"]: {why}')])

    def _pick_ip(self, me: tuple[str, str]) -> str:
        # Like the real allocator: the low band is left for explicitly requested IPs (10.96.0.10 for DNS).
        size = self.network.num_addresses
        low = min(max(16, size // 16), 256) if size > 32 else 1
        used = self._used_ips(me)
        start = int(self.network.network_address)
        candidates = range(start + low, start + size - 1)
        for _ in range(200):
            ip = str(ipaddress.ip_address(random.choice(candidates)))
            if ip not in used:
                return ip
        for n in candidates:
            ip = str(ipaddress.ip_address(n))
            if ip not in used:
                return ip
        raise invalid(SERVICES, me[1], [("spec.clusterIPs", "Internal error: range is full")])

    def _node_ports(self, spec: dict[str, Any], old_spec: dict[str, Any], me: tuple[str, str]) -> None:
        """kubernetes pkg/registry/core/service/storage/alloc.go, initNodePorts/updateNodePorts: a port without a
        nodePort gets one only when `shouldAllocateNodePorts` (NodePort, or a LoadBalancer whose
        allocateLoadBalancerNodePorts is not false: "Don't allocate new ports, but do respect specific
        requests"); a requested nodePort the Service did not hold is allocated or refused, field
        spec.ports[i].nodePort, with the port allocator's message. storage.go, patchAllocatedValues: a port sent
        without its nodePort on an update keeps the one it had."""
        used = self._used_ports(me)
        held = {p.get("nodePort") for p in old_spec.get("ports") or [] if isinstance(p, dict) and p.get("nodePort")}
        old_ports = {(p.get("port"), p.get("protocol", "TCP")): p.get("nodePort") for p in old_spec.get("ports") or []}
        allocate = spec.get("type") == "NodePort" or spec.get("allocateLoadBalancerNodePorts") is not False
        for i, p in enumerate(spec.get("ports") or []):
            if not isinstance(p, dict):
                continue
            requested = p.get("nodePort")
            if requested:
                if requested not in held:
                    self._check_node_port(requested, used, me, i)
                used.add(requested)
                continue
            previous = old_ports.get((p.get("port"), p.get("protocol", "TCP")))
            if previous:
                p["nodePort"] = previous
                continue
            if not allocate:
                continue
            free = [n for n in range(NODE_PORT_RANGE[0], NODE_PORT_RANGE[1] + 1) if n not in used]
            p["nodePort"] = random.choice(free)
            used.add(p["nodePort"])

    def _check_node_port(self, port: Any, used: set[int], me: tuple[str, str], index: int) -> None:
        """pkg/registry/core/service/portallocator: ErrNotInRange / ErrAllocated, as the apiserver words them."""
        where = f"spec.ports[{index}].nodePort"
        if not isinstance(port, int) or not NODE_PORT_RANGE[0] <= port <= NODE_PORT_RANGE[1]:
            why = (f"provided port is not in the valid range. The range of valid ports is "
                   f"{NODE_PORT_RANGE[0]}-{NODE_PORT_RANGE[1]}")
            raise invalid(SERVICES, me[1], [(where, f"Invalid value: {port}: {why}")])
        if port in used:
            raise invalid(SERVICES, me[1], [(where, f"Invalid value: {port}: provided port is already allocated")])
