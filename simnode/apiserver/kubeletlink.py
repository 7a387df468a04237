"""The API server's calls to a kubelet (`pods/log`), with the kubelet client certificate it read once, at start.

kubernetes/kubernetes pkg/kubelet/client/kubelet_client.go: NewNodeConnectionInfoGetter -> MakeTransport ->
client-go transport.TLSConfigFor, whose loadTLSFiles reads --kubelet-client-certificate/--kubelet-client-key into
memory when the server starts (the config sets no ReloadTLSFiles): a renewed file is used only by a new process.
The kubelet's HTTPS server (port 10250) verifies that certificate against its authentication.x509.clientCAFile at
each handshake, so once the in-memory one expired every `kubectl logs` fails. There is no kubelet HTTPS server in
the simulated node: the kubelet's handshake check is made here, then the container log is read from the node root.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from simnode.paths import NodeRoot

log = logging.getLogger("simnode.apiserver.kubelet")

KUBELET_CONFIG = "/var/lib/kubelet/config.yaml"
KUBELET_PORT = 10250


class KubeletClientError(Exception):
    """The kubelet client certificate named by the flags cannot be loaded (the server does not start)."""


class KubeletCallError(Exception):
    """A call to the kubelet failed; the message is what the real API server returns."""

    def __init__(self, message: str, *, status: int = 500, reason: str = "InternalError") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class KubeletClientCert:
    file: str  # as the flag names it
    cert: x509.Certificate


def load_kubelet_client(root: NodeRoot, cert_file: str | None, key_file: str | None) -> KubeletClientCert | None:
    """Read the pair once (transport.TLSConfigFor loadTLSFiles); None when the flags are not given."""
    if not cert_file or not key_file:
        return None
    data: dict[str, bytes] = {}
    for flag in (cert_file, key_file):
        try:
            data[flag] = root.path(flag).read_bytes()
        except OSError as exc:
            raise KubeletClientError(f"open {flag}: {(exc.strerror or str(exc)).lower()}") from exc
    try:
        cert = x509.load_pem_x509_certificate(data[cert_file])
        serialization.load_pem_private_key(data[key_file], password=None)
    except ValueError as exc:
        raise KubeletClientError(f"tls: failed to find any PEM data in {cert_file} / {key_file}: {exc}") from exc
    return KubeletClientCert(cert_file, cert)


class KubeletLink:
    def __init__(self, root: NodeRoot, client: KubeletClientCert | None) -> None:
        self.root = root
        self.client = client

    def container_log(self, pod: dict[str, Any], node: dict[str, Any] | None, container: str | None,
                      tail_lines: int | None) -> str:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        names = [c.get("name") for c in spec.get("containers") or []]
        if container is None:
            if len(names) != 1:
                raise KubeletCallError(f"a container name must be specified for pod {meta['name']}, choose one of: "
                                       f"[{' '.join(str(n) for n in names)}]", status=400, reason="BadRequest")
            container = str(names[0])
        elif container not in names:
            raise KubeletCallError(f"container {container} is not valid for pod {meta['name']}", status=400,
                                   reason="BadRequest")
        if not spec.get("nodeName") or node is None:
            raise KubeletCallError(f"pod {meta['name']} does not have a host assigned", status=400,
                                   reason="BadRequest")
        url = f"https://{_address(node)}:{_port(node)}/containerLogs/{meta['namespace']}/{meta['name']}/{container}"
        self._handshake(url)
        return _tail(self._log_file(meta, spec["nodeName"], container), tail_lines)

    def _handshake(self, url: str) -> None:
        """What the kubelet's TLS server does with our client certificate (crypto/tls processCertsFromClient:
        an expired one gets alertCertificateExpired, an unknown issuer alertUnknownCA)."""
        if self.client is None:
            raise KubeletCallError(f'Get "{url}": remote error: tls: certificate required')
        cert, now = self.client.cert, datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            log.warning("kubelet client certificate %s (serial %x, loaded at start) is not valid now: notAfter %s",
                        self.client.file, cert.serial_number, cert.not_valid_after_utc.isoformat())
            raise KubeletCallError(f'Get "{url}": remote error: tls: expired certificate')
        if not any(_signed_by(cert, ca) for ca in self._kubelet_client_cas()):
            raise KubeletCallError(f'Get "{url}": remote error: tls: unknown certificate authority')

    def _kubelet_client_cas(self) -> list[x509.Certificate]:
        try:
            config = yaml.safe_load(self.root.path(KUBELET_CONFIG).read_text())
            ca_file = config["authentication"]["x509"]["clientCAFile"]
            return x509.load_pem_x509_certificates(self.root.path(ca_file).read_bytes())
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
            return []

    def _log_file(self, meta: dict[str, Any], node_name: str, container: str) -> Path:
        name = str(meta["name"])
        if "kubernetes.io/config.mirror" in (meta.get("annotations") or {}):
            name = name.removesuffix(f"-{node_name}")  # the simulated kubelet names a static pod's log by its file
        return self.root.path(f"/var/log/pods/{meta['namespace']}_{name}/{container}.log")


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _address(node: dict[str, Any]) -> str:
    addresses = (node.get("status") or {}).get("addresses") or []
    for kind in ("InternalIP", "ExternalIP", "Hostname"):  # kubeadm's --kubelet-preferred-address-types
        for address in addresses:
            if address.get("type") == kind and address.get("address"):
                return str(address["address"])
    return str(node["metadata"]["name"])


def _port(node: dict[str, Any]) -> int:
    endpoint = ((node.get("status") or {}).get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}
    return int(endpoint.get("Port") or KUBELET_PORT)


def _tail(path: Path, tail_lines: int | None) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    if tail_lines is None:
        return text
    lines = text.splitlines(keepends=True)
    return "".join(lines[-tail_lines:]) if tail_lines > 0 else ""
