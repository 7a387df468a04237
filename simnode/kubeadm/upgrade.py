"""`kubeadm upgrade apply VERSION`: check the version skew, rewrite the static pod manifests with the new
image tags (everything else kept), wait for each component to come back, update the kubeadm-config
ConfigMap and the CoreDNS/kube-proxy addon images.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import yaml

from simnode.kubeadm import addons
from simnode.kubeadm.apiclient import apply, client_for, core, namespaced, wait_for
from simnode.kubeadm.apiphases import config_map
from simnode.kubeadm.config import Config, kubeadm_images
from simnode.kubeadm.configdoc import cluster_configuration_yaml, read_cluster_configuration
from simnode.kubeadm.errors import ConfigError, KubeadmError, PhaseError
from simnode.kubeadm.manifests import CONTROL_PLANE, ETCD, manifest_path, write_manifest
from simnode.kubeadm.waitcp import wait_api
from simnode.kubeclient import ApiError, KubeClient
from simnode.paths import NodeRoot
from simnode.versions import VERSIONS

Out = Callable[[str], None]
PHASE = "upgrade/apply"
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
COMPONENT_TIMEOUT_S = 300.0


def parse_version(text: str) -> tuple[int, int, int]:
    m = _VERSION.match(text)
    if not m:
        raise KubeadmError(f'[upgrade/version] FATAL: the --version argument is invalid: "{text}" is not of the '
                           'form vX.Y.Z')
    major, minor, patch = (int(g) for g in m.groups())
    return major, minor, patch


def check_target(target: str, kubeadm_version: str, cluster_version: str) -> str:
    """The normalized target version, or KubeadmError naming the broken skew rule."""
    t = parse_version(target)
    normalized = "v{}.{}.{}".format(*t)
    if normalized not in VERSIONS:
        raise KubeadmError(f'[upgrade/version] FATAL: version "{normalized}" is not a version the simulated node '
                           f"offers (known: {', '.join(VERSIONS)})")
    if t > parse_version(kubeadm_version):
        raise KubeadmError(f'[upgrade/version] FATAL: the specified version to upgrade to "{normalized}" is higher '
                           f'than the kubeadm version "{kubeadm_version}". Upgrade kubeadm first')
    c = parse_version(cluster_version)
    if t[0] != c[0] or t[1] not in (c[1], c[1] + 1) or (t[1] == c[1] and t[2] < c[2]):
        raise KubeadmError(f'[upgrade/version] FATAL: upgrading from "{cluster_version}" to "{normalized}" is not '
                           "supported: the target must be the same minor version (not older) or the next one")
    return normalized


def _retag(pod: dict[str, Any], image: str) -> dict[str, Any]:
    new = copy.deepcopy(pod)
    new["spec"]["containers"][0]["image"] = image
    return new


def load_manifests(root: NodeRoot) -> dict[str, dict[str, Any]]:
    """All four static pod manifests, or KubeadmError naming the missing/broken one (before any write)."""
    pods: dict[str, dict[str, Any]] = {}
    for component in (ETCD, *CONTROL_PLANE):
        path = manifest_path(component)
        try:
            pod = yaml.safe_load(root.path(path).read_text())
            _ = pod["spec"]["containers"][0]["image"]
        except FileNotFoundError as exc:
            raise KubeadmError(f"[upgrade] FATAL: {path}: file does not exist (is this a kubeadm control-plane "
                               "node?)") from exc
        except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
            raise KubeadmError(f"[upgrade] FATAL: {path}: not a usable static Pod manifest") from exc
        pods[component] = pod
    return pods


async def _component_ready(client: KubeClient, component: str, image: str) -> bool:
    pods = await client.list("/api/v1/namespaces/kube-system/pods", label_selector=f"component={component}")
    for pod in pods.get("items") or []:
        containers = (pod.get("spec") or {}).get("containers") or [{}]
        conditions = (pod.get("status") or {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        if containers[0].get("image") == image and ready:
            return True
    return False


async def read_cluster(client: KubeClient) -> Any:
    try:
        cm = await client.get("/api/v1/namespaces/kube-system/configmaps/kubeadm-config")
    except ApiError as exc:
        raise KubeadmError(f"[upgrade/config] FATAL: cannot read the kubeadm-config ConfigMap: {exc}") from exc
    text = str((cm.get("data") or {}).get("ClusterConfiguration") or "")
    try:
        return read_cluster_configuration(text, tuple(VERSIONS))
    except ConfigError as exc:
        raise KubeadmError(f"[upgrade/config] FATAL: {exc}") from exc


async def upgrade_apply(root: NodeRoot, target: str, kubeadm_version: str, *, yes: bool, config: Config | None,
                        ask: Callable[[str], str], out: Out) -> None:
    out("[upgrade/config] Making sure the configuration is correct:")
    out("[preflight] Running pre-flight checks.")
    pods = load_manifests(root)
    async with client_for(root, timeout_s=5.0) as client:
        out("[upgrade] Running cluster health checks")
        if not await client.readyz():
            raise KubeadmError(f"[upgrade/health] FATAL: the API server at {client.server} is not ready; the "
                               "control plane must be up to upgrade it")
        cluster = await read_cluster(client)
        version = check_target(target, kubeadm_version, cluster.kubernetes_version)
        repo = config.cluster.image_repository if config is not None else cluster.image_repository
        out(f'[upgrade/version] You have chosen to change the cluster version to "{version}"')
        out(f"[upgrade/versions] Cluster version: {cluster.kubernetes_version}")
        out(f"[upgrade/versions] kubeadm version: {kubeadm_version}")
        if not yes:
            answer = ask("[upgrade] Are you sure you want to proceed? [y/N]: ")
            if answer.strip().lower() not in ("y", "yes"):
                raise KubeadmError("won't proceed; the user didn't answer (Y|y) in order to continue")
        images = kubeadm_images(repo, version)
        out(f'[upgrade/apply] Upgrading your Static Pod-hosted control plane to version "{version}" (timeout: 5m0s)...')
        for component in (ETCD, *CONTROL_PLANE):
            await _upgrade_component(root, client, component, pods[component], images[component], out)
        cluster.kubernetes_version = version
        cluster.image_repository = repo
        out('[upload-config] Storing the configuration used in ConfigMap "kubeadm-config" in the "kube-system" '
            "Namespace")
        data = {"ClusterConfiguration": cluster_configuration_yaml(cluster)}
        await apply(client, core("kube-system", "configmaps"), config_map("kube-system", "kubeadm-config", data))
        await _upgrade_addons(client, images, out)
    out(f'\n[upgrade/successful] SUCCESS! Your cluster was upgraded to "{version}". Enjoy!\n')
    out("[upgrade/kubelet] Now that your control plane is upgraded, please proceed with upgrading your kubelets "
        "if you haven't already done so.")


async def _upgrade_component(root: NodeRoot, client: KubeClient, component: str, pod: dict[str, Any], image: str,
                             out: Out) -> None:
    out(f'[upgrade/staticpods] Preparing for "{component}" upgrade')
    if pod["spec"]["containers"][0]["image"] == image:
        out(f'[upgrade/staticpods] Current and new manifests of {component} are equal, skipping upgrade')
        return
    out(f'[upgrade/staticpods] Moving new manifest to "{manifest_path(component)}"')
    write_manifest(root, component, _retag(pod, image))
    out("[upgrade/staticpods] Waiting for the kubelet to restart the component")
    out("[upgrade/staticpods] This can take up to 5m0s")
    try:
        # The mirror pod shows the new image and Ready only once the kubelet runs the new manifest (the old
        # API server may still answer until then); API errors while it restarts are retried.
        await wait_for(f"{component} to run {image}", COMPONENT_TIMEOUT_S,
                       lambda: _component_ready(client, component, image), interval_s=0.5)
        if component == "kube-apiserver":
            await wait_api(root, COMPONENT_TIMEOUT_S, out, phase=PHASE)
    except TimeoutError as exc:
        raise PhaseError(PHASE, f"couldn't upgrade control plane: {component}: {exc}") from exc
    out(f'[upgrade/staticpods] Component "{component}" upgraded successfully!')


async def _upgrade_addons(client: KubeClient, images: dict[str, str], out: Out) -> None:
    """Set the new images on the addons kubeadm installed (only those that exist)."""
    for kind, name, image, label in (("deployments", "coredns", images["coredns"], "CoreDNS"),
                                     ("daemonsets", "kube-proxy", images["kube-proxy"], "kube-proxy")):
        path = f"{namespaced(addons.APPS, 'kube-system', kind)}/{name}"
        try:
            obj = await client.get(path)
        except ApiError as exc:
            if exc.status == 404:
                out(f"[addons] Skipping {label}: not installed")
                continue
            raise
        containers = obj["spec"]["template"]["spec"]["containers"]
        containers[0]["image"] = image
        await client.patch(path, {"spec": {"template": {"spec": {"containers": containers}}}}, patch_type="merge")
        out(f"[addons] Applied essential addon: {label}")
