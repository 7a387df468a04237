"""stop: ends what runs of a running node and keeps everything else (run by the engine in state `stopped`).

Kept: etcd's data, the PKI, kubeconfigs, the kubeadm config and static pod manifests, the images, the binaries
and the saved cluster parameters, so that a start re-enters the install at the kubelet step and finds every
step before it done.

Stopping the kubelet is not enough: a kubelet that exits leaves its pods' containers running (the kubelet's
SIGTERM handling stops no pod; pods are stopped by the kubelet's sync loop only, which is gone), so the API
server would go on answering. On a real node (root "/") those are the engine's containers that cri-dockerd
created for pods: it labels each one `io.kubernetes.pod.namespace` (Mirantis/cri-dockerd core/container_create.go
and core/sandbox_helpers.go set the kubelet's `types.KubernetesPodNamespaceLabel`, kubernetes
pkg/kubelet/types/labels.go; simnode/kubelet/engine.py follows the same),
and they are stopped, not removed (the kubelet removes and re-creates them when it starts again). Under any
other root the engine is shared with other nodes and cannot be told apart, so only processes count there.
Then, as the reset does (states/reset.py), every process of the node still running is ended (lifecycle.hostprocs):
the simulated node's static pods, a kubelet a killed service left without a record. Idempotent.
"""

from __future__ import annotations

from pathlib import Path

from lifecycle.errors import TemporaryError
from lifecycle.ports import EngineError
from lifecycle.step import StepContext
from states.reset import end_what_still_runs

POD_LABEL = "io.kubernetes.pod.namespace"  # cri-dockerd's label on every container of a pod (see above)


async def stop_node(ctx: StepContext) -> None:
    ctx.progress("stopping the kubelet", current=1, total=3)
    await ctx.ports.kubelet.stop()

    if ctx.paths.root.resolve() == Path("/"):
        ctx.progress("stopping the pods' containers", current=2, total=3)
        try:
            stopped = await ctx.ports.docker.stop_containers([POD_LABEL])
        except EngineError as exc:
            raise TemporaryError(f"could not stop the pods' containers: {exc}", code="stop_incomplete") from exc
        if stopped:
            ctx.progress(f"stopped {len(stopped)} pod container(s)")

    ctx.progress("ending what still runs of the node", current=3, total=3)
    await end_what_still_runs(ctx, code="stop_incomplete", saying="ending")
