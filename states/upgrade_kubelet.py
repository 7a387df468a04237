"""upgrade_kubelet: the staged binaries (kubelet, kubeadm, kubectl, crictl, CNI plugins) of the new version moved
into place (each a temp copy, fsync, rename: a reader sees the old file or the new one), the `binaries` record
with them, then the kubelet restarted on the new binary and healthy. kubeadm's order for a control-plane node:
after `kubeadm upgrade apply` (kubernetes docs, tasks/administer-cluster/kubeadm/kubeadm-upgrade, "Upgrade
kubelet and kubectl"). Leaves `<staging>/kubelet.restarted` naming the version once the new kubelet is healthy.
Done when that file names the target, the binaries match the target's image and the kubelet is healthy.
Boot evidence: once done, the `binaries` step's (`binaries-boot.json`) is recorded anew for the files now in place,
so the first boot after an upgrade takes the fast path (lifecycle.step.BootEvidence) instead of hashing them."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from lifecycle.errors import PermanentError
from lifecycle.paths import HostPaths
from lifecycle.step import BootCheck, StepContext, finish_in_thread
from states.binaries import RECORD_NAME, Binaries
from states.kubelet import Kubelet
from states.upgrade_binaries import staged

MARKER = "kubelet.restarted"


class UpgradeKubelet:
    name = "upgrade_kubelet"
    timeout_s = 180.0
    retries = 1  # moving the files again and restarting the kubelet is safe

    async def is_done(self, ctx: StepContext) -> bool:
        marker = staged(ctx).paths.root / MARKER
        try:
            if (await asyncio.to_thread(marker.read_text)).strip() != ctx.cluster.kubernetes_version:
                return False
        except OSError:
            return False
        return await Binaries().is_done(ctx) and await Kubelet().is_done(ctx)

    async def run(self, ctx: StepContext) -> None:
        stage = staged(ctx).paths
        if not await Binaries().is_done(ctx):
            if not (stage.state_dir / RECORD_NAME).is_file():
                raise PermanentError(f"the staged binaries of {ctx.cluster.kubernetes_version} are gone ({stage.root})",
                                     code="upgrade_staging_missing")
            moved = await finish_in_thread(_move_into_place, ctx.paths, stage, list(ctx.config.kubernetes.binaries))
            ctx.progress(f"{moved} binaries of {ctx.cluster.kubernetes_version} in place", current=moved,
                         total=moved, unit="files")
        ctx.progress("restarting the kubelet on the new binary")
        await ctx.ports.kubelet.stop()
        await Kubelet().run(ctx)
        await asyncio.to_thread((stage.root / MARKER).write_text, f"{ctx.cluster.kubernetes_version}\n")

    async def before_retry(self, ctx: StepContext) -> None:
        return None

    async def boot_check(self, ctx: StepContext) -> BootCheck:
        return BootCheck.UNKNOWN  # never asked: a boot checks the install's steps before the kubelet, not this one

    async def record_boot_evidence(self, ctx: StepContext) -> None:
        # The binaries in /usr/bin changed under the `binaries` step's evidence (the old files' sizes and mtimes,
        # the old image): without this the next boot finds it stale and hashes every file before the kubelet.
        await Binaries().record_boot_evidence(ctx)


def _move_into_place(paths: HostPaths, stage: HostPaths, names: list[str]) -> int:
    """Copy each staged file next to its destination, then rename over it; the record last, once all are there."""
    dirs: set[Path] = set()
    for name in names:
        dest = paths.under(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        temp = dest.with_name(f".{dest.name}.lifecycle-upgrade")
        shutil.copyfile(stage.under(name), temp)
        temp.chmod(0o755)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        temp.replace(dest)
        dirs.add(dest.parent)
    for directory in dirs:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    record = paths.state_dir / RECORD_NAME
    temp_record = record.with_name(f".{RECORD_NAME}.upgrade")
    shutil.copyfile(stage.state_dir / RECORD_NAME, temp_record)
    temp_record.replace(record)
    return len(names)
