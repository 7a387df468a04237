"""Issue 11, "nothing blocks the loop": CPU work of the steps (YAML of any size, here the addon manifests) runs
off the event loop. Each step is run with every callback timed (lifecycle.loopwatch) against 50 ms."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from stepkit import make_config, make_ctx

import states.certs
from lifecycle.config import AddonsConfig
from lifecycle.loopwatch import watch_callbacks
from states.addons import Addons
from states.certs import Certs

BUDGET_S = 0.05


def _large_manifest(directory: Path) -> None:
    """A ConfigMap of 4000 keys (~200 kB of YAML): PyYAML needs several hundred ms of CPU for it."""
    lines = ["apiVersion: v1", "kind: ConfigMap", "metadata:", "  name: big", "  namespace: default", "data:"]
    lines += [f"  key{i}: \"value number {i} of the large addon manifest\"" for i in range(4000)]
    (directory / "big.yaml").write_text("\n".join(lines) + "\n")


async def test_the_addons_step_parses_its_manifests_off_the_loop(tmp_path: Path) -> None:
    manifests = tmp_path / "addons"
    manifests.mkdir()
    _large_manifest(manifests)
    config = make_config(tmp_path / "root")
    config = type(config)(**{**config.__dict__, "addons": AddonsConfig(manifests_dir=manifests)})
    ctx, _ = make_ctx(config)
    blocked: list[dict[str, Any]] = []
    stop = watch_callbacks(BUDGET_S, report=lambda message, fields: blocked.append(fields)
                           if message == "loop blocked" else None)
    try:
        # A task of its own, as the engine runs a step: a callback started after the timing began.
        done = await asyncio.create_task(Addons().is_done(ctx), name="step-addons-is-done")
    finally:
        stop()
    assert done is False  # no admin.conf: not done, after reading the manifests
    assert blocked == []


async def test_the_certs_step_renders_the_kubeadm_config_off_the_loop(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """PyYAML's emitter takes ~4 ms of CPU for the kubeadm config: under the 50 ms budget, but on the loop it held
    the events queued behind it, three times per install (is_done, run, the outcome check)."""
    on_loop_thread: list[bool] = []
    render = states.certs.render_kubeadm_config

    def watched(*args: Any, **kwargs: Any) -> bytes:
        on_loop_thread.append(threading.current_thread() is threading.main_thread())
        return render(*args, **kwargs)

    monkeypatch.setattr(states.certs, "render_kubeadm_config", watched)
    ctx, _ = make_ctx(make_config(tmp_path / "root"))
    done = await asyncio.create_task(Certs().is_done(ctx), name="step-certs-is-done")
    assert done is False  # no PKI yet
    assert on_loop_thread == [False]
