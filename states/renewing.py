"""renewing: new leaf certificates and kubeconfigs from the same CAs, then restarts what reads them only at start:
the kubelet; etcd, controller-manager and scheduler through an annotation on their manifests; kube-apiserver last,
the same way, once the others are back. Done when the restarted API server serves the new certificate and every
restarted pod (the API server's included) is Ready again.
"""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from lifecycle import yamlsafe
from lifecycle.atomicfile import write_atomic
from lifecycle.errors import PermanentError, TemporaryError
from lifecycle.paths import HostPaths
from lifecycle.pki_specs import PkiParams
from lifecycle.pki_x509 import load_cert
from lifecycle.ports import KubeApiError
from lifecycle.protocol import iso_time
from lifecycle.renewal import RenewalError, leaves_to_renew, plan_renewal, write_renewal
from lifecycle.step import StepContext, fail_at
from states.kubelet import healthz, kubelet_argv
from states.readiness import NAMESPACE, pod_ready

# Components that read their certificates or kubeconfig only at start, restarted while the API server answers.
RESTARTED_MANIFESTS = ("etcd.yaml", "kube-controller-manager.yaml", "kube-scheduler.yaml")
# kube-apiserver reloads its serving certificate, but reads its kubelet client certificate once, at start
# (kubernetes/kubernetes pkg/kubelet/client/kubelet_client.go: MakeTransport -> client-go transport.TLSConfigFor
# loads --kubelet-client-certificate into memory; no reload), so `kubectl logs/exec` fail once the old one expires.
# Restarted last, after the others are Ready: on a single node the API is away only for its own restart.
APISERVER_MANIFEST = "kube-apiserver.yaml"
ANNOTATION = "lifecycle/certs-renewed-at"
_POLL_S = 0.3
_PHASE_MAX_S = 60.0  # each wait below (kubelet, serving certificate, pods) gets at most this long


async def renew(ctx: StepContext) -> list[str]:
    """Run by the engine in state `renewing`; returns the renewed files. A `PermanentError` with
    `details.node_changed = False` means nothing was written (the cluster runs on as before)."""
    params = PkiParams.from_config(ctx.config, api_port=ctx.cluster.api_port, node_ip=ctx.node_ip)
    try:
        files = await asyncio.to_thread(plan_renewal, ctx.paths, params, now=datetime.now(UTC))
    except RenewalError as exc:
        raise PermanentError(str(exc), code="renewal_impossible",
                             details={"file": exc.file, "node_changed": False}) from exc
    except ValueError as exc:
        raise PermanentError(str(exc), code="invalid_config", details={"node_changed": False}) from exc
    write = asyncio.create_task(asyncio.to_thread(write_renewal, files), name="renew-write-files")
    try:
        names = await asyncio.shield(write)
    except asyncio.CancelledError:
        await write  # a thread cannot be stopped: let the renames end before a reset touches the same files
        raise
    except RenewalError as exc:  # refused while staging, before any rename
        raise PermanentError(str(exc), code="renewal_impossible",
                             details={"file": exc.file, "node_changed": False}) from exc
    for index, name in enumerate(names, start=1):
        ctx.progress(f"renewed {name}", current=index, total=len(names), unit="files")
    ctx.log.info("certificates renewed", files=names)
    await _restart_kubelet(ctx)
    serving = load_cert(await asyncio.to_thread((ctx.paths.pki_dir / "apiserver.crt").read_bytes))
    await _wait_serving(ctx, expected=serving)
    await _restart_static_pods(ctx)
    return names


async def _restart_static_pods(ctx: StepContext) -> None:
    """etcd, controller-manager and scheduler while the API answers; then kube-apiserver, alone, once they are back."""
    stamp = iso_time(datetime.now(UTC).timestamp())
    components = await asyncio.to_thread(annotate_manifests, ctx.paths, stamp=stamp)
    ctx.progress(f"restarting {', '.join(components)} (manifests annotated {ANNOTATION}={stamp})")
    await _wait_restarted(ctx, components=components, stamp=stamp)
    apiserver = await asyncio.to_thread(annotate_manifests, ctx.paths, stamp=stamp, names=(APISERVER_MANIFEST,))
    if apiserver:
        ctx.progress(f"restarting {apiserver[0]} last (manifest annotated {ANNOTATION}={stamp})")
        gap_s = await _wait_restarted(ctx, components=apiserver, stamp=stamp)
        ctx.progress(f"{apiserver[0]} restarted: the API did not answer for {gap_s:.1f} s")


async def renewal_due(ctx: StepContext) -> list[str]:
    """The leaves the certs step would re-issue on a node with a cluster: the engine renews them with `renew`
    instead (see Engine._renew_instead), so that what reads them is restarted."""
    params = PkiParams.from_config(ctx.config, api_port=ctx.cluster.api_port, node_ip=ctx.node_ip)
    return await asyncio.to_thread(leaves_to_renew, ctx.paths, params, now=datetime.now(UTC))


async def _restart_kubelet(ctx: StepContext) -> None:
    argv = kubelet_argv(ctx.paths)
    ctx.progress("restarting the kubelet (client certificate)")
    await ctx.ports.kubelet.stop()
    try:
        await ctx.ports.kubelet.start(argv, log_path=ctx.paths.log_dir / "kubelet.log")
    except OSError as exc:
        raise PermanentError(f"cannot start {argv[0]}: {exc}", code="kubelet_start_failed") from exc
    loop = asyncio.get_running_loop()
    give_up_at = min(fail_at(ctx), loop.time() + _PHASE_MAX_S)
    port = ctx.cluster.kubelet_healthz_port
    while True:
        healthy, detail = await healthz(port, timeout_s=max(0.1, min(2.0, give_up_at - loop.time())))
        if healthy:
            ctx.progress("kubelet healthy")
            return
        if loop.time() + _POLL_S >= give_up_at:
            raise TemporaryError(f"the kubelet restarted with its new certificate is not healthy on "
                                 f"http://127.0.0.1:{port}/healthz ({detail})", code="kubelet_unhealthy")
        await asyncio.sleep(_POLL_S)


async def _wait_serving(ctx: StepContext, *, expected: x509.Certificate) -> None:
    """Until the API server's TLS handshake presents the new apiserver.crt (it reloads it, without a restart)."""
    host, port = ctx.node_ip, ctx.cluster.api_port
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE  # compared byte for byte with the file below, not verified
    wanted = expected.public_bytes(Encoding.DER)
    loop = asyncio.get_running_loop()
    give_up_at = min(fail_at(ctx), loop.time() + _PHASE_MAX_S)
    seen = "no answer"
    while True:
        try:
            async with asyncio.timeout(2.0):
                _, writer = await asyncio.open_connection(host, port, ssl=tls)
            ssl_object = writer.get_extra_info("ssl_object")
            served = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            writer.close()
            if served == wanted:
                ctx.progress("the API server serves the new certificate")
                return
            seen = "the previous certificate"
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            seen = str(exc) or type(exc).__name__
        if loop.time() + _POLL_S >= give_up_at:
            raise TemporaryError(f"the API server at {host}:{port} does not serve the renewed apiserver.crt "
                                 f"(last seen: {seen})", code="serving_cert_not_reloaded")
        await asyncio.sleep(_POLL_S)


def annotate_manifests(paths: HostPaths, *, stamp: str, names: tuple[str, ...] = RESTARTED_MANIFESTS) -> list[str]:
    """Set ANNOTATION=stamp in the static pod manifests that must restart; returns their `component` labels."""
    components: list[str] = []
    for name in names:
        path = paths.manifests_dir / name
        try:
            pod = yamlsafe.load(path.read_text())
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            continue  # an external etcd, say: nothing of ours to restart
        meta = pod.setdefault("metadata", {})
        meta.setdefault("annotations", {})[ANNOTATION] = stamp
        # Dot-prefixed temp file: the kubelet ignores hidden files in the manifest directory.
        write_atomic(path, yaml.safe_dump(pod, sort_keys=False).encode(), mode)
        components.append(str((meta.get("labels") or {}).get("component") or meta.get("name")))
    return components


async def _wait_restarted(ctx: StepContext, *, components: list[str], stamp: str) -> float:
    """Until each component has a Ready pod carrying the new annotation (its mirror pod copies the manifest's; for
    kube-apiserver, Ready is its new process's /readyz, the kubelet's readiness probe). Returns how long the API did
    not answer meanwhile (0.0 if it always did), measured at this poll's resolution."""
    loop = asyncio.get_running_loop()
    give_up_at = min(fail_at(ctx), loop.time() + _PHASE_MAX_S)
    waiting = dict.fromkeys(components, "no restarted pod yet")
    away_since: float | None = None
    gap_s = 0.0
    async with ctx.ports.kube.connect(ctx.paths.admin_conf) as api:  # the renewed admin.conf: proves it works
        while True:
            try:
                pods = await api.list_pods(NAMESPACE)
                if away_since is not None:
                    gap_s += loop.time() - away_since
                    away_since = None
            except KubeApiError as exc:
                away_since = loop.time() if away_since is None else away_since
                pods, waiting = [], dict.fromkeys(waiting, f"API error: {exc.message}")
            for pod in pods:
                meta = pod.get("metadata") or {}
                component = (meta.get("labels") or {}).get("component")
                if component in waiting and (meta.get("annotations") or {}).get(ANNOTATION) == stamp:
                    if pod_ready(pod):
                        del waiting[component]
                        ctx.progress(f"{component} restarted and Ready")
                    else:
                        waiting[component] = "restarted, not Ready yet"
            if not waiting:
                return gap_s
            if loop.time() + _POLL_S >= give_up_at:
                reasons = "; ".join(f"{c}: {why}" for c, why in waiting.items())
                raise TemporaryError(f"control-plane pods not back after the renewal: {reasons}",
                                     code="not_ready", details={"components": waiting})
            await asyncio.sleep(_POLL_S)

