"""upgrade_binaries: extract kubeadm, kubelet, kubectl, crictl and the CNI plugins of the target version into a
staging root (`<state_dir>/upgrade/<version>/usr/bin/...`, lifecycle.upgrade.staging_paths) while the old ones
run; the `binaries` step's copy, record and checks, pointed at that root. Nothing under `<root>/usr/bin` changes.
Done when the staged record matches the target's binaries image and every staged file its sha256."""

from __future__ import annotations

from dataclasses import replace

from lifecycle.step import StepContext
from lifecycle.upgrade import staging_paths
from states.binaries import Binaries


def staged(ctx: StepContext) -> StepContext:
    """The context with the staging root as its node root (the cluster already names the target version)."""
    return replace(ctx, paths=staging_paths(ctx.paths, ctx.cluster.kubernetes_version))


class UpgradeBinaries(Binaries):
    name = "upgrade_binaries"

    async def is_done(self, ctx: StepContext) -> bool:
        return await super().is_done(staged(ctx))

    async def run(self, ctx: StepContext) -> None:
        await super().run(staged(ctx))

    async def before_retry(self, ctx: StepContext) -> None:
        await super().before_retry(staged(ctx))
