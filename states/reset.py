"""reset: takes the node back to before the install (run by the engine in state `resetting`).

Stops the kubelet, runs `kubeadm reset -f` (static pods, manifests, kubeconfigs, /var/lib/kubelet, /var/lib/etcd,
the PKI), then removes what the service generated (PKI, kubeconfigs, kubeadm config, `*.stamp.json` stamps).
Keeps the images, the extracted binaries and the engine's own state files. Idempotent.
"""

from __future__ import annotations

import shutil

from lifecycle.errors import StepError
from lifecycle.paths import KUBECONFIG_NAMES
from lifecycle.step import StepContext
from states.kubeadm import cri_socket_flag, run_kubeadm

# Stamps that record finished steps are named `<what>.stamp.json`; the engine's state and sequence files are not.
STAMP_GLOB = "*.stamp.json"
# An interrupted kubeadm retry's temp dirs; the readiness wait's credentials scratch dir of older versions
# (states/controlplane.py now loads the key from memory).
_LEFTOVER_GLOBS = ("kubeadm-kubeconfigs-*", "kubeadm-scratch-certs-*", "readyz-credentials-*")
_EXTRA_KUBECONFIGS = ("bootstrap-kubelet.conf",)


async def reset(ctx: StepContext) -> None:
    paths = ctx.paths
    ctx.progress("stopping the kubelet", current=1, total=3)
    await ctx.ports.kubelet.stop()

    kubeadm_failure: StepError | None = None
    if paths.binary("kubeadm").is_file():
        ctx.progress("kubeadm reset -f", current=2, total=3)
        try:
            await run_kubeadm(ctx, ["reset", "-f", f"--cert-dir={paths.pki_dir}", cri_socket_flag(ctx)],
                              retryable=True)
        except StepError as exc:
            # Still remove our own files below, then report: a half-reset node is worse than a reported one.
            kubeadm_failure = exc
    else:
        ctx.progress("kubeadm is not installed: nothing for kubeadm reset to do", current=2, total=3)

    ctx.progress("removing generated files", current=3, total=3)
    removed: list[str] = []
    if paths.pki_dir.exists():
        shutil.rmtree(paths.pki_dir)
        removed.append(str(paths.pki_dir))
    for name in (*KUBECONFIG_NAMES, *_EXTRA_KUBECONFIGS):
        if paths.kubeconfig(name).exists():
            paths.kubeconfig(name).unlink()
            removed.append(str(paths.kubeconfig(name)))
    if paths.kubeadm_config.exists():
        paths.kubeadm_config.unlink()
        removed.append(str(paths.kubeadm_config))
    if paths.state_dir.is_dir():
        for stamp in sorted(paths.state_dir.glob(STAMP_GLOB)):
            stamp.unlink()
            removed.append(str(stamp))
        for pattern in _LEFTOVER_GLOBS:
            for leftover in paths.state_dir.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
    for path in removed:
        ctx.progress(f"removed {path}")
    if kubeadm_failure is not None:
        raise kubeadm_failure
