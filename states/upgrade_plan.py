"""upgrade_plan: `kubeadm upgrade plan <version>` with the staged (new) kubeadm against the running cluster: the API
answers, the kubeadm-config ConfigMap is readable, and kubeadm sees the cluster at the version the service
recorded. Changes nothing; leaves `<staging>/plan.ok` (the target version) once it passed.
Done when that file names the target version."""

from __future__ import annotations

import asyncio

from lifecycle.errors import PermanentError
from lifecycle.step import StepContext
from lifecycle.upgrade import read_record
from states.kubeadm import run_kubeadm
from states.upgrade_binaries import staged

MARKER = "plan.ok"


class UpgradePlan:
    name = "upgrade_plan"
    timeout_s = 60.0
    retries = 1  # read-only: safe to repeat (an API server that was briefly busy)

    async def is_done(self, ctx: StepContext) -> bool:
        marker = staged(ctx).paths.root / MARKER
        try:
            return (await asyncio.to_thread(marker.read_text)).strip() == ctx.cluster.kubernetes_version
        except OSError:
            return False

    async def run(self, ctx: StepContext) -> None:
        version = ctx.cluster.kubernetes_version
        record = read_record(ctx.paths)
        lines: list[str] = []
        # --rootfs: the staged kubeadm works on the node's root, not on the staging root it lies under.
        await run_kubeadm(staged(ctx), ["upgrade", "plan", version, f"--rootfs={ctx.paths.root}"], retryable=True,
                          lines=lines)
        cluster_line = next((line for line in lines if line.startswith("[upgrade/versions] Cluster version:")), "")
        seen = cluster_line.rpartition(":")[2].strip()
        if record is not None and seen != record.from_version:
            raise PermanentError(
                f"kubeadm upgrade plan sees the cluster at {seen or 'an unknown version'}, the service recorded "
                f"{record.from_version}: not upgrading a cluster that is not what it seems",
                code="upgrade_not_allowed", details={"kubeadm_sees": seen, "recorded": record.from_version})
        marker = staged(ctx).paths.root / MARKER
        await asyncio.to_thread(marker.write_text, f"{version}\n")

    async def before_retry(self, ctx: StepContext) -> None:
        return None
