"""The admin kubeconfig for the host (`kubeconfig` request): read from `<root>/etc/kubernetes/admin.conf`, checked
(the configured endpoint and names, a client certificate valid now) and re-rendered with embedded data. Reads
only. The reply carries credentials: it goes to the requester's response topic alone, with a short expiry.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from urllib.parse import urlparse

from lifecycle.config import Config
from lifecycle.errors import RequestError
from lifecycle.kubefiles import KubeconfigSpec, parse_kubeconfig, render_kubeconfig
from lifecycle.paths import HostPaths
from lifecycle.pki import rooted_reader
from lifecycle.pki_x509 import load_cert, load_key
from lifecycle.protocol import Reply, Request, Status

KUBECONFIG_EXPIRY_S = 60  # MQTT 5 message expiry of the reply: a credential nobody picked up does not linger


def admin_kubeconfig(config: Config, paths: HostPaths, *, now: datetime) -> bytes:
    """The host's kubeconfig (YAML); RequestError `not_ready` naming why there is none to give."""
    try:
        data = paths.admin_conf.read_bytes()
    except FileNotFoundError:
        raise RequestError("not_ready", "there is no admin kubeconfig yet: install first") from None
    try:
        content = parse_kubeconfig(data, read_file=rooted_reader(paths.root, paths.kubernetes_dir))
        cert = load_cert(content.cert_pem)
        load_cert(content.ca_pem)
        load_key(content.key_pem)
    except ValueError as exc:
        raise RequestError("not_ready", f"admin.conf is not usable ({exc}); an install repairs it") from None
    k8s = config.kubernetes
    host = urlparse(content.server).hostname or ""
    if host != k8s.endpoint_name.strip("[]").lower() or not content.server.startswith("https://"):
        raise RequestError("not_ready", f"admin.conf points at {content.server!r}, not at the configured endpoint "
                                        f"{k8s.endpoint_name!r}; an install re-issues it")
    if cert.not_valid_after_utc <= now:
        raise RequestError("not_ready", "the admin client certificate has expired; renew the certificates")
    spec = KubeconfigSpec(file="admin.conf", server=content.server, cluster=k8s.cluster_name, user=k8s.user_name,
                          context=k8s.context_name, common_name="")
    return render_kubeconfig(spec, ca_pem=content.ca_pem, cert_pem=content.cert_pem, key_pem=content.key_pem)


async def kubeconfig_reply(request: Request, *, status: Status, config: Config, paths: HostPaths) -> Reply:
    """The reply to a `kubeconfig` request (RequestError when there is nothing to give yet)."""
    if status.state == "resetting":
        raise RequestError("not_ready", "a reset is removing the cluster and its kubeconfigs")
    if status.kubernetes_version is None:
        raise RequestError("not_ready", f"no cluster has been installed (state {status.state})")
    text = await asyncio.to_thread(admin_kubeconfig, config, paths, now=datetime.now(UTC))
    return Reply(id=request.id, ok=True, state=status.state, request_id=status.request_id,
                 kubeconfig=text.decode(), message_expiry_s=KUBECONFIG_EXPIRY_S)
