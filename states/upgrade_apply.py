"""upgrade_apply: `kubeadm upgrade apply <version> -y` with the staged (new) kubeadm: it rewrites the static pod
manifests one component at a time, waits for each to be healthy and puts the old manifests back when one is not
(kubernetes cmd/kubeadm/app/phases/upgrade/staticpods.go), then updates the kubeadm-config ConfigMap and the
CoreDNS and kube-proxy images. Then the service's own kubeadm config and stamp are rewritten for the new version
(what the install's `certs` and `kubeadm` steps check), so a later re-check finds the cluster as it is.
Done when the control-plane manifests run the target's images and the kubeadm config and stamp name it.
kubeadm rolled back: the old control plane is waited for, and the step fails `upgrade_rolled_back` (permanent:
the engine returns to `running` on the old version with this error)."""

from __future__ import annotations

import asyncio
import hashlib

import yaml

from lifecycle import yamlsafe
from lifecycle.atomicfile import write_atomic
from lifecycle.errors import CommandError, PermanentError
from lifecycle.step import StepContext, finish_in_thread
from lifecycle.upgrade import control_plane_version, read_record
from states.certs import KUBEADM_CONFIG_MODE, kubeadm_config_for
from states.controlplane import wait_control_plane
from states.kubeadm import read_stamp_doc, run_kubeadm, write_stamp
from states.upgrade_binaries import staged

CONTROL_PLANE_MANIFESTS = ("kube-apiserver.yaml", "kube-controller-manager.yaml", "kube-scheduler.yaml")


class UpgradeApply:
    name = "upgrade_apply"
    timeout_s = 600.0  # kubeadm waits up to 5 min per component (UpgradeManifestTimeout)
    retries = 0  # kubeadm rolled back or stopped half-way: the engine decides, a blind repeat does not

    async def is_done(self, ctx: StepContext) -> bool:
        return await asyncio.to_thread(_applied, ctx)

    async def run(self, ctx: StepContext) -> None:
        version = ctx.cluster.kubernetes_version
        if not await asyncio.to_thread(_manifests_at, ctx, version):
            await self._apply(ctx, version)
        text = await kubeadm_config_for(ctx)
        await finish_in_thread(write_atomic, ctx.paths.kubeadm_config, text, KUBEADM_CONFIG_MODE)
        await finish_in_thread(lambda: write_stamp(ctx, config_sha256=hashlib.sha256(text).hexdigest(),
                                                   config_text=text.decode()))
        ctx.progress(f"the service's kubeadm config and stamp now say {version}")

    async def before_retry(self, ctx: StepContext) -> None:
        return None

    async def _apply(self, ctx: StepContext, version: str) -> None:
        argv = ["upgrade", "apply", version, "-y", f"--rootfs={ctx.paths.root}"]
        try:
            await run_kubeadm(staged(ctx), argv, retryable=False)
        except CommandError as exc:
            running = await asyncio.to_thread(control_plane_version, ctx.paths)
            if running == version:
                raise  # the control plane changed: failed on the new version (the engine says so)
            record = read_record(ctx.paths)
            old = record.from_version if record is not None else running
            ctx.progress(f"kubeadm put the {old} control plane back; waiting for it to answer")
            await wait_control_plane(ctx)  # same ports: only the images differ
            raise PermanentError(
                f"kubeadm upgrade apply {version} failed and rolled the control plane back to {old}: "
                f"{exc.message}", code="upgrade_rolled_back",
                details={**exc.details, "running_version": old, "target_version": version},
            ) from exc


def _manifests_at(ctx: StepContext, version: str) -> bool:
    for name in CONTROL_PLANE_MANIFESTS:
        try:
            pod = yamlsafe.load((ctx.paths.manifests_dir / name).read_text())
            image = str(pod["spec"]["containers"][0]["image"])
        except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
            return False
        if image.rpartition(":")[2] != version:
            return False
    return True


def _applied(ctx: StepContext) -> bool:
    version = ctx.cluster.kubernetes_version
    if not _manifests_at(ctx, version):
        return False
    try:
        text = ctx.paths.kubeadm_config.read_bytes()
    except OSError:
        return False
    stamp = read_stamp_doc(ctx.paths) or {}
    if stamp.get("kubeadm_config_sha256") != hashlib.sha256(text).hexdigest():
        return False
    docs = [d for d in yamlsafe.load_all(text) if isinstance(d, dict)]
    return any(d.get("kind") == "ClusterConfiguration" and d.get("kubernetesVersion") == version for d in docs)
