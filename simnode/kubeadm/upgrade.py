"""`kubeadm upgrade apply VERSION` and `kubeadm upgrade plan [VERSION]`: check the version skew, rewrite the
static pod manifests with the new image tags (everything else kept), wait for each component to come back
(putting the old manifests back when one does not), update the kubeadm-config ConfigMap and the
CoreDNS/kube-proxy addon images. The old manifests are kept in /etc/kubernetes/tmp while a component upgrades.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import yaml

from simnode.faults import FaultsFileError, load_faults
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
# kubeadm: cmd/kubeadm/app/phases/upgrade/staticpods.go, UpgradeManifestTimeout (5 min) per component; the
# faults file's kubeadm_upgrade_timeout_s shortens it for tests.
COMPONENT_TIMEOUT_S = 300.0
BACKUP_DIR = "/etc/kubernetes/tmp"


def parse_version(text: str) -> tuple[int, int, int]:
    m = _VERSION.match(text)
    if not m:
        raise KubeadmError(f'[upgrade/version] FATAL: the --version argument is invalid: "{text}" is not of the '
                           'form vX.Y.Z')
    major, minor, patch = (int(g) for g in m.groups())
    return major, minor, patch


def check_target(target: str, kubeadm_version: str, cluster_version: str, *,
                 kubelet_versions: tuple[str, ...] = (), force: bool = False) -> str:
    """The normalized target version, or KubeadmError naming the broken skew rules.

    kubeadm: cmd/kubeadm/app/phases/upgrade/policy.go, EnforceVersionPolicies: "mandatory" errors always stop
    the upgrade, "skippable" ones unless --force (cmd/kubeadm/app/cmd/upgrade/apply.go). Stricter than upstream
    on one point: no downgrade at all (upstream lets a downgrade of one minor through)."""
    t = parse_version(target)
    normalized = "v{}.{}.{}".format(*t)
    if normalized not in VERSIONS:
        raise KubeadmError(f'[upgrade/version] FATAL: version "{normalized}" is not a version the simulated node '
                           f"offers (known: {', '.join(VERSIONS)})")
    k = parse_version(kubeadm_version)
    c = parse_version(cluster_version)
    mandatory: list[str] = []
    skippable: list[str] = []
    # policy.go: MaximumAllowedMinorVersionUpgradeSkew = 1
    if t[0] != c[0] or t[1] > c[1] + 1:
        mandatory.append(f'Specified version to upgrade to "{normalized}" is too high; kubeadm can upgrade only 1 '
                         "minor version at a time")
    if t < c:  # ours: upstream allows one minor down (MaximumAllowedMinorVersionDowngradeSkew); we never do
        mandatory.append(f'Specified version to upgrade to "{normalized}" is lower than the cluster version '
                         f'"{cluster_version}"; downgrades are not supported')
    # policy.go: a kubeadm older than the target: a higher minor is mandatory, a higher patch skippable
    if t > k:
        if t[1] > k[1]:
            mandatory.append(f'Specified version to upgrade to "{normalized}" is at least one minor release higher '
                             f"than the kubeadm minor release ({t[1]} > {k[1]}). Such an upgrade is not supported")
        else:
            skippable.append(f'Specified version to upgrade to "{normalized}" is higher than the kubeadm version '
                             f'"{kubeadm_version}". Upgrade kubeadm first using the tool you used to install kubeadm')
    # policy.go: a kubeadm newer than the target
    if k[0] > t[0] or k[1] > t[1]:
        skippable.append(f"Kubeadm version {kubeadm_version} can only be used to upgrade to Kubernetes version "
                         f"{k[0]}.{k[1]}")
    # policy.go, detectTooOldKubelets: MaximumAllowedMinorVersionKubeletSkew = 1
    too_old = sorted(v for v in kubelet_versions if t[1] > parse_version(v)[1] + 1)
    if too_old:
        skippable.append(f"There are kubelets in this cluster that are too old that have these versions {too_old}")
    if mandatory:
        raise KubeadmError("[upgrade/version] FATAL: the --version argument is invalid due to these fatal errors:\n\n"
                           + "".join(f"\t- {m}\n" for m in mandatory)
                           + "\nPlease fix the misalignments highlighted above and try upgrading again")
    if skippable and not force:
        raise KubeadmError("[upgrade/version] FATAL: the --version argument is invalid due to these errors:\n\n"
                           + "".join(f"\t- {m}\n" for m in skippable)
                           + "\nCan be bypassed if you pass the --force flag")
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


async def kubelet_versions(client: KubeClient) -> tuple[str, ...]:
    """The kubelet versions the Node objects report (kubeadm: phases/upgrade/versiongetter.go, KubeletVersions)."""
    nodes = await client.list("/api/v1/nodes")
    found = {str(((n.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion") or "")
             for n in nodes.get("items") or []}
    return tuple(sorted(v for v in found if _VERSION.match(v)))


def _upgrade_timeout_s(root: NodeRoot) -> float:
    try:
        faults = load_faults(root.faults_file)
    except FaultsFileError as exc:
        raise KubeadmError(f"[upgrade] FATAL: {exc}") from exc
    return faults.kubeadm_upgrade_timeout_s if faults.kubeadm_upgrade_timeout_s is not None else COMPONENT_TIMEOUT_S


async def upgrade_plan(root: NodeRoot, target: str | None, kubeadm_version: str, *, out: Out) -> None:
    """kubeadm: cmd/kubeadm/app/cmd/upgrade/plan.go: health checks, the versions, and what `upgrade apply` would
    change. The skew rules are apply's (plan only prints); a missing manifest or an API that is not ready fails."""
    out("[preflight] Running pre-flight checks.")
    pods = load_manifests(root)
    async with client_for(root, timeout_s=5.0) as client:
        out("[upgrade] Running cluster health checks")
        if not await client.readyz():
            raise KubeadmError(f"[upgrade/health] FATAL: the API server at {client.server} is not ready")
        cluster = await read_cluster(client)
        kubelets = await kubelet_versions(client)
    wanted = target or kubeadm_version
    parse_version(wanted)
    out(f"[upgrade/versions] Cluster version: {cluster.kubernetes_version}")
    out(f"[upgrade/versions] kubeadm version: {kubeadm_version}")
    out(f"[upgrade/versions] Target version: {wanted}")
    out("\nComponents that must be upgraded manually after you have upgraded the control plane with "
        "'kubeadm upgrade apply':")
    out("COMPONENT   NODE   CURRENT   TARGET")
    for version in kubelets:
        out(f"kubelet     -      {version}   {wanted}")
    out("\nUpgrade to the latest stable version:\n")
    out("COMPONENT                 NODE   CURRENT   TARGET")
    for component in CONTROL_PLANE:
        image = str(pods[component]["spec"]["containers"][0]["image"])
        out(f"{component:<25} -      {image.rpartition(':')[2]}   {wanted}")
    out(f"\nYou can now apply the upgrade by executing the following command:\n\n\tkubeadm upgrade apply {wanted}\n")


async def upgrade_apply(root: NodeRoot, target: str, kubeadm_version: str, *, yes: bool, config: Config | None,
                        ask: Callable[[str], str], out: Out, force: bool = False) -> None:
    out("[upgrade/config] Making sure the configuration is correct:")
    out("[preflight] Running pre-flight checks.")
    pods = load_manifests(root)
    async with client_for(root, timeout_s=5.0) as client:
        out("[upgrade] Running cluster health checks")
        if not await client.readyz():
            raise KubeadmError(f"[upgrade/health] FATAL: the API server at {client.server} is not ready; the "
                               "control plane must be up to upgrade it")
        cluster = await read_cluster(client)
        version = check_target(target, kubeadm_version, cluster.kubernetes_version,
                               kubelet_versions=await kubelet_versions(client), force=force)
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
        timeout_s = _upgrade_timeout_s(root)
        backups: dict[str, str] = {}
        for component in (ETCD, *CONTROL_PLANE):
            try:
                await _upgrade_component(root, client, component, pods[component], images[component], out,
                                         backups=backups, timeout_s=timeout_s)
            except PhaseError as exc:
                raise _rollback(root, backups, exc, restore_etcd=component == ETCD) from exc
        _remove_backups(root, backups)
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
                             out: Out, *, backups: dict[str, str], timeout_s: float) -> None:
    out(f'[upgrade/staticpods] Preparing for "{component}" upgrade')
    if pod["spec"]["containers"][0]["image"] == image:
        out(f'[upgrade/staticpods] Current and new manifests of {component} are equal, skipping upgrade')
        return
    # kubeadm: phases/upgrade/staticpods.go, upgradeComponent: the current manifest is moved to the backup dir
    # before the new one is moved in; rollbackOldManifests moves it back.
    backup = f"{BACKUP_DIR}/kubeadm-backup-manifests/{component}.yaml"
    root.path(backup).parent.mkdir(parents=True, exist_ok=True)
    root.path(backup).write_text(root.path(manifest_path(component)).read_text())
    backups[component] = backup
    out(f'[upgrade/staticpods] Moved new manifest to "{manifest_path(component)}" and backed up old manifest to '
        f'"{backup}"')
    write_manifest(root, component, _retag(pod, image))
    out("[upgrade/staticpods] Waiting for the kubelet to restart the component")
    out(f"[upgrade/staticpods] This can take up to {timeout_s:g}s")
    try:
        # The mirror pod shows the new image and Ready only once the kubelet runs the new manifest (the old
        # API server may still answer until then); API errors while it restarts are retried.
        await wait_for(f"{component} to run {image}", timeout_s,
                       lambda: _component_ready(client, component, image), interval_s=0.5)
        if component == "kube-apiserver":
            await wait_api(root, timeout_s, out, phase=PHASE)
    except (TimeoutError, KubeadmError) as exc:
        raise PhaseError(PHASE, f"couldn't upgrade control plane: {component}: {exc}") from exc
    out(f'[upgrade/staticpods] Component "{component}" upgraded successfully!')


def _rollback(root: NodeRoot, backups: dict[str, str], cause: PhaseError, *, restore_etcd: bool) -> KubeadmError:
    """kubeadm: phases/upgrade/staticpods.go, rollbackOldManifests: every backed-up manifest goes back (etcd's
    only when etcd itself failed: a newer etcd keeps running), and the error always says so."""
    problems: list[str] = [str(cause)]
    for component, backup in backups.items():
        if component == ETCD and not restore_etcd:
            continue
        try:
            write_manifest(root, component, yaml.safe_load(root.path(backup).read_text()))
        except OSError as exc:
            problems.append(f"{component}: {exc}")
    return PhaseError(PHASE, "couldn't upgrade control plane. kubeadm has tried to recover everything into the "
                             f"earlier state. Errors faced: [{'; '.join(problems)}]")


def _remove_backups(root: NodeRoot, backups: dict[str, str]) -> None:
    """Kept on failure for the user (staticpods.go: "we want the directories preserved"), removed on success."""
    for backup in backups.values():
        root.path(backup).unlink(missing_ok=True)


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
