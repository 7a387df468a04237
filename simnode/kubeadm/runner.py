"""Runs a prepared `InitPlan` phase by phase: fault knobs first (delay, injected failure), then the phase's
writes (PKI, kubeconfigs, manifests, kubelet files) or API calls, printing kubeadm's lines.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization

from simnode.faults import FaultsFileError, load_faults
from simnode.kubeadm import manifests
from simnode.kubeadm.errors import KubeadmError, PhaseError
from simnode.kubeadm.kubeconfig import write_kubeconfigs
from simnode.kubeadm.kubeletfiles import finalize_client_cert, write_kubelet_start
from simnode.kubeadm.phases import InitPlan, Out, kubeconfig_files
from simnode.kubeadm.pki import PHASE_TO_NAME, write_pki
from simnode.kubeadm.preflight import run_preflight

if TYPE_CHECKING:
    from simnode.kubeclient import KubeClient

# The API phases import aiohttp (slow to import); the file-only phases the service runs first do not
# need it, so those modules are imported inside the handlers that use them.

CONTROL_PLANE_SUBS = {"apiserver": "kube-apiserver", "controller-manager": "kube-controller-manager",
                      "scheduler": "kube-scheduler"}


async def check_faults(plan: InitPlan, phase: str) -> None:
    """Sleep the configured phase delay, then fail if a fault targets this phase (before it writes)."""
    try:
        delay_s = load_faults(plan.root.faults_file).delay_s("kubeadm_phase")
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        fail = load_faults(plan.root.faults_file).kubeadm_fail
    except FaultsFileError as exc:
        raise KubeadmError(f"simnode faults file: {exc}") from exc
    if fail is not None and fail.phase.partition("/")[0] == phase:
        raise PhaseError(fail.phase, fail.message, exit_code=fail.exit_code)


async def _with_client(plan: InitPlan, phase: str, work: Callable[[KubeClient], Awaitable[None]]) -> None:
    from simnode.kubeadm.apiclient import client_for, ensure_admin_binding
    from simnode.kubeclient import ApiError

    try:
        if not plan.admin_binding_done:
            await ensure_admin_binding(plan.root)
            plan.admin_binding_done = True
        async with client_for(plan.root, timeout_s=min(10.0, plan.cfg.init.api_call_timeout_s)) as client:
            await work(client)
    except ApiError as exc:
        raise PhaseError(phase, str(exc)) from exc
    except TimeoutError as exc:
        raise PhaseError(phase, str(exc)) from exc


async def _certs(plan: InitPlan, subs: list[str], out: Out) -> None:
    assert plan.pki is not None
    out(f'[certs] Using certificateDir folder "{plan.cfg.cert_dir}"')
    write_pki(plan.pki, plan.root, [PHASE_TO_NAME[s] for s in subs], out)


async def _kubeconfig(plan: InitPlan, subs: list[str], out: Out) -> None:
    assert plan.kubeconfigs is not None
    out('[kubeconfig] Using kubeconfig folder "/etc/kubernetes"')
    write_kubeconfigs(plan.kubeconfigs, plan.root, kubeconfig_files(plan.cfg, subs), out)


async def _etcd(plan: InitPlan, subs: list[str], out: Out) -> None:
    out(f'[etcd] Creating static Pod manifest for local etcd in "{manifests.MANIFESTS_DIR}"')
    manifests.write_manifest(plan.root, manifests.ETCD, manifests.etcd(plan.cfg))


async def _control_plane(plan: InitPlan, subs: list[str], out: Out) -> None:
    out(f'[control-plane] Using manifest folder "{manifests.MANIFESTS_DIR}"')
    for sub in subs:
        component = CONTROL_PLANE_SUBS[sub]
        out(f'[control-plane] Creating static Pod manifest for "{component}"')
        manifests.write_manifest(plan.root, component, manifests.BUILDERS[component](plan.cfg))


async def _kubelet_start(plan: InitPlan, subs: list[str], out: Out) -> None:
    write_kubelet_start(plan.cfg, plan.root, out)


async def _wait(plan: InitPlan, subs: list[str], out: Out) -> None:
    from simnode.kubeadm.waitcp import wait_control_plane
    from simnode.kubeclient import ApiError

    try:
        await wait_control_plane(plan.cfg, plan.root, out)
    except ApiError as exc:  # admin.conf unusable as a client
        raise PhaseError("wait-control-plane", str(exc)) from exc


async def _upload_config(plan: InitPlan, subs: list[str], out: Out) -> None:
    from simnode.kubeadm import apiphases

    async def work(client: KubeClient) -> None:
        if "kubeadm" in subs:
            await apiphases.upload_kubeadm_config(plan.cfg, client, out)
        if "kubelet" in subs:
            await apiphases.upload_kubelet_config(plan.cfg, client, out)

    await _with_client(plan, "upload-config", work)


async def _upload_certs(plan: InitPlan, subs: list[str], out: Out) -> None:
    if not plan.upload_certs:
        out("[upload-certs] Skipping phase. Please see --upload-certs")
        return
    from simnode.kubeadm.uploadcerts import upload_certs

    await _with_client(plan, "upload-certs", lambda client: upload_certs(
        plan.cfg, plan.root, client, out, print_key=plan.print_certificate_key))


async def _mark(plan: InitPlan, subs: list[str], out: Out) -> None:
    from simnode.kubeadm import apiphases

    await _with_client(plan, "mark-control-plane", lambda client: apiphases.mark_control_plane(plan.cfg, client, out))


async def _bootstrap(plan: InitPlan, subs: list[str], out: Out) -> None:
    from simnode.kubeadm import apiphases

    assert plan.ca_cert is not None
    ca = plan.ca_cert
    await _with_client(plan, "bootstrap-token", lambda client: apiphases.bootstrap_tokens(plan.cfg, client, ca, out))


async def _finalize(plan: InitPlan, subs: list[str], out: Out) -> None:
    try:
        finalize_client_cert(plan.root, out)
    except (OSError, ValueError) as exc:
        raise PhaseError("kubelet-finalize", str(exc)) from exc


async def _addon(plan: InitPlan, subs: list[str], out: Out) -> None:
    from simnode.kubeadm import addons

    async def work(client: KubeClient) -> None:
        if "coredns" in subs:
            if plan.cfg.cluster.dns_disabled:
                out("[addons] Skipping the CoreDNS addon (dns.disabled)")
            else:
                await addons.apply_coredns(plan.cfg, client, out)
        if "kube-proxy" in subs:
            if plan.cfg.cluster.proxy_disabled:
                out("[addons] Skipping the kube-proxy addon (proxy.disabled)")
            else:
                await addons.apply_kube_proxy(plan.cfg, client, out)

    await _with_client(plan, "addon", work)


async def _show_join(plan: InitPlan, subs: list[str], out: Out) -> None:
    if not plan.full_init:
        return
    assert plan.ca_cert is not None
    spki = plan.ca_cert.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    token = plan.cfg.init.bootstrap_tokens[0].token.split(".")[0] + ".<redacted>" if plan.cfg.init.bootstrap_tokens \
        else "<token>"
    out("\nYour Kubernetes control-plane has initialized successfully!\n\n"
        "To start using your cluster, you need to run the following as a regular user:\n\n"
        "  mkdir -p $HOME/.kube\n  sudo cp -i /etc/kubernetes/admin.conf $HOME/.kube/config\n"
        "  sudo chown $(id -u):$(id -g) $HOME/.kube/config\n\n"
        "Alternatively, if you are the root user, you can run:\n\n  export KUBECONFIG=/etc/kubernetes/admin.conf\n\n"
        "You should now deploy a pod network to the cluster.\n"
        'Run "kubectl apply -f [podnetwork].yaml" with one of the options listed at:\n'
        "  https://kubernetes.io/docs/concepts/cluster-administration/addons/\n\n"
        "Then you can join any number of worker nodes by running the following on each as root:\n\n"
        f"kubeadm join {plan.cfg.control_plane_endpoint} --token {token} \\\n"
        f"\t--discovery-token-ca-cert-hash sha256:{hashlib.sha256(spki).hexdigest()}")


HANDLERS: dict[str, Callable[[InitPlan, list[str], Out], Awaitable[None]]] = {
    "preflight": lambda plan, subs, out: _preflight(plan, out),
    "certs": _certs,
    "kubeconfig": _kubeconfig,
    "etcd": _etcd,
    "control-plane": _control_plane,
    "kubelet-start": _kubelet_start,
    "wait-control-plane": _wait,
    "upload-config": _upload_config,
    "upload-certs": _upload_certs,
    "mark-control-plane": _mark,
    "bootstrap-token": _bootstrap,
    "kubelet-finalize": _finalize,
    "addon": _addon,
    "show-join-command": _show_join,
}


async def _preflight(plan: InitPlan, out: Out) -> None:
    ignored = plan.ignore_preflight | {e.lower() for e in plan.cfg.init.ignore_preflight_errors}
    run_preflight(plan.cfg, plan.root, ignored, out)


async def run_plan(plan: InitPlan, out: Out) -> None:
    for phase, subs in plan.selection.items():
        await check_faults(plan, phase)
        await HANDLERS[phase](plan, subs, out)
