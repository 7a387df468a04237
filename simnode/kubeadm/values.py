"""Value syntax shared by config validation and the phases: Go durations, CIDRs, DNS names, endpoints."""

from __future__ import annotations

import ipaddress
import re

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")


def parse_duration_s(text: str) -> float:
    """Parse a Go duration ("4m0s", "1h30m", "500ms") into seconds; ValueError when it is not one."""
    s = text.strip()
    sign = 1.0
    if s and s[0] in "+-":
        sign, s = (-1.0 if s[0] == "-" else 1.0), s[1:]
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if not s:
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * total


def format_duration(seconds: float) -> str:
    """Go's time.Duration.String() for whole and fractional seconds: 240 -> "4m0s", 31536000 -> "8760h0m0s"."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 1:
        return f"{sign}{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    secs_text = f"{secs:.9f}".rstrip("0").rstrip(".")
    if hours:
        return f"{sign}{int(hours)}h{int(minutes)}m{secs_text}s"
    if minutes:
        return f"{sign}{int(minutes)}m{secs_text}s"
    return f"{sign}{secs_text}s"


def is_dns_subdomain(name: str) -> bool:
    return len(name) <= 253 and bool(_DNS_SUBDOMAIN.match(name))


def is_wildcard_dns(name: str) -> bool:
    return name.startswith("*.") and is_dns_subdomain(name[2:])


def parse_ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_cidrs(text: str) -> list[IPNetwork]:
    """A comma-separated CIDR list (dual-stack allows two); host bits are masked off like Go's ParseCIDR."""
    nets: list[IPNetwork] = []
    for part in text.split(","):
        part = part.strip()
        if "/" not in part:
            raise ValueError(f"couldn't parse subnet: invalid CIDR address: {part}")
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError as exc:
            raise ValueError(f"couldn't parse subnet: invalid CIDR address: {part}") from exc
    if len(nets) > 2 or (len(nets) == 2 and nets[0].version == nets[1].version):
        raise ValueError("expected one CIDR or one IPv4 and one IPv6 CIDR (dual-stack)")
    return nets


def nth_ip(net: IPNetwork, n: int) -> IPAddress:
    """The n-th address of a subnet (1 -> the API service IP, 10 -> the DNS service IP)."""
    if n >= net.num_addresses:
        raise ValueError(f"subnet {net} is too small to hold address number {n}")
    return net.network_address + n


def split_host_port(endpoint: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port` -> (host, port or None); ValueError on a bad port."""
    if endpoint.startswith("["):
        host, _, rest = endpoint[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and not rest.startswith(":"):
            raise ValueError(f"invalid endpoint {endpoint!r}")
    elif endpoint.count(":") == 1:
        host, port_text = endpoint.split(":")
    else:
        host, port_text = endpoint, None
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f'port "{port_text}" must be a valid number between 1 and 65535, inclusive')
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
