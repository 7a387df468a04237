"""After an upgrade the binaries' boot evidence describes the new files, so the first boot after it takes the fast
path (issue 10: the boot trusts local evidence; an upgrade replaces every binary under it)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, cast

import structlog
from lifecycle_fakes import make_config

from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.step import BootCheck, BootEvidence, ClusterParams, StepContext
from states.binaries import EVIDENCE_NAME, RECORD_NAME, Binaries
from states.upgrade_kubelet import UpgradeKubelet


class _Images:
    """The container engine as far as the boot check asks it: the local id of each image."""

    def __init__(self, ids: dict[str, str]) -> None:
        self.ids = ids

    async def image_id(self, ref: str) -> str | None:
        return self.ids.get(ref)


def _context(root: Path, version: str, ids: dict[str, str]) -> StepContext:
    config = make_config(root)
    return StepContext(
        config=config, paths=HostPaths(root),
        cluster=ClusterParams(kubernetes_version=version, api_port=16443, kubelet_healthz_port=20248),
        ports=Ports(docker=cast(Any, _Images(ids)), commands=cast(Any, None), kubelet=cast(Any, None),
                    kube=cast(Any, None)),
        request_id="up", deadline=time.monotonic() + 30, log=structlog.get_logger("test"),
        progress=lambda *a, **k: None,
    )


def _install_binaries(ctx: StepContext, *, image_id: str, content: bytes) -> None:
    """Files and record as the binaries step (or upgrade_kubelet's move into place) leaves them."""
    files = {}
    for name in ctx.config.kubernetes.binaries:
        path = ctx.paths.under(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content + name.encode())
        files[name] = {"sha256": hashlib.sha256(content + name.encode()).hexdigest()}
    ctx.paths.state_dir.mkdir(parents=True, exist_ok=True)
    (ctx.paths.state_dir / RECORD_NAME).write_text(json.dumps({"image_id": image_id, "files": files}))


async def test_the_first_boot_after_an_upgrade_finds_the_binaries_evidence_of_the_new_version(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    old_image = config.kubernetes.binaries_image_for("v1.31.4")
    new_image = config.kubernetes.binaries_image_for("v1.32.1")
    ids = {old_image: "sha256:old", new_image: "sha256:new"}
    old = _context(tmp_path, "v1.31.4", ids)
    _install_binaries(old, image_id="sha256:old", content=b"old kubelet")
    await Binaries().record_boot_evidence(old)  # the install's evidence
    assert await Binaries().boot_check(old) == BootCheck.VERIFY_LATER

    # upgrade_kubelet moved the new files and record into place; the engine then records its step's evidence.
    new = _context(tmp_path, "v1.32.1", ids)
    _install_binaries(new, image_id="sha256:new", content=b"new kubelet, longer")
    step = UpgradeKubelet()
    assert isinstance(step, BootEvidence)
    await step.record_boot_evidence(new)
    evidence = json.loads((tmp_path / "var/lib/lifecycle" / EVIDENCE_NAME).read_text())
    assert evidence["image_id"] == "sha256:new"
    # The boot after the upgrade (cluster on v1.32.1): the evidence holds, the full hash waits for the background.
    assert await Binaries().boot_check(new) == BootCheck.VERIFY_LATER
