"""The host units the service sets through the machine's systemctl (the simulated one, simnode/systemd.py):
cri-dockerd's drop-in with the pulled pause image (finding 10) keeps the packaged flags, restarts cri-dockerd only
when it changed, and refuses a machine it cannot configure before writing anything; kubelet.service is masked
(finding 13), and a unit file of its own in its place is refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
from stepkit import ProgressLog, make_config, make_ctx, with_k8s

from lifecycle.errors import PermanentError
from lifecycle.hostunits import DROP_IN, configure_cri_dockerd, cri_dockerd_configured, mask_kubelet_unit
from lifecycle.step import StepContext
from simnode.host import install_kubelet_package_units, prepare_host

PAUSE = "127.0.0.1:5000/none/pause:3.10"  # stepkit's repository and pause tag


def _units(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "run/simnode/systemd/units.json").read_text())
    return data


def _running_argv(root: Path) -> list[str]:
    return [str(a) for a in _units(root)["cri-docker.service"]["argv"]]


def _systemctl(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(root / "usr/bin/systemctl"), *args], capture_output=True, text=True, timeout=30,
                          check=False)


@pytest.fixture
def ctx(tmp_path: Path) -> StepContext:
    root = tmp_path / "root"
    prepare_host(root)
    context, _ = make_ctx(make_config(root))
    return context


async def test_the_drop_in_gives_the_running_cri_dockerd_our_pause_image_once(ctx: StepContext) -> None:
    root = ctx.paths.root
    # The packaged flags stay; an older pause flag from another drop-in is replaced, not repeated.
    extra = root / "etc/systemd/system/cri-docker.service.d/05-site.conf"
    extra.parent.mkdir(parents=True)
    extra.write_text("[Service]\nExecStart=\nExecStart=/usr/bin/cri-dockerd --container-runtime-endpoint fd:// "
                     "--pod-infra-container-image=registry.k8s.io/pause:3.9 --log-level info\n")
    assert not await cri_dockerd_configured(ctx)
    await configure_cri_dockerd(ctx)
    assert _running_argv(root) == ["/usr/bin/cri-dockerd", "--container-runtime-endpoint", "fd://", "--log-level",
                                   "info", f"--pod-infra-container-image={PAUSE}"]
    text = (root / DROP_IN.lstrip("/")).read_text()
    assert "ExecStart=\n" in text and (root / DROP_IN.lstrip("/")).stat().st_mode & 0o777 == 0o644
    assert await cri_dockerd_configured(ctx)

    started = _units(root)["cri-docker.service"]["since"]
    await configure_cri_dockerd(ctx)  # unchanged: no restart
    assert _units(root)["cri-docker.service"]["since"] == started

    # Another version's pause image: rewritten and restarted.
    moved, _ = make_ctx(with_k8s(ctx.config, image_repository="registry.example.test/k8s"))
    assert not await cri_dockerd_configured(moved)
    await configure_cri_dockerd(moved)
    assert _running_argv(root)[-1] == "--pod-infra-container-image=registry.example.test/k8s/pause:3.10"


async def test_a_machine_that_cannot_be_configured_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    root = tmp_path / "root"
    prepare_host(root)
    ctx, _ = make_ctx(make_config(root))
    drop_in = root / DROP_IN.lstrip("/")

    (root / "usr/bin/systemctl").unlink()
    with pytest.raises(PermanentError) as err:
        await configure_cri_dockerd(ctx)
    assert err.value.code == "systemctl_missing" and not drop_in.exists()

    prepare_host(root)  # systemctl back
    mask = root / "etc/systemd/system/cri-docker.service"
    mask.parent.mkdir(parents=True, exist_ok=True)
    mask.symlink_to("/dev/null")
    with pytest.raises(PermanentError) as err:
        await configure_cri_dockerd(ctx)
    assert err.value.code == "cri_dockerd_masked" and not drop_in.exists()
    mask.unlink()

    two = root / "etc/systemd/system/cri-docker.service.d/20-two.conf"
    two.parent.mkdir(parents=True)
    two.write_text("[Service]\nExecStart=/usr/bin/cri-dockerd --log-level debug\n")  # no reset: two commands
    with pytest.raises(PermanentError) as err:
        await configure_cri_dockerd(ctx)
    assert err.value.code == "cri_dockerd_unit_invalid" and "2 ExecStart=" in err.value.message
    assert not drop_in.exists()

    bare, _ = make_ctx(make_config(tmp_path / "bare", cri_socket="unix:///var/run/cri-dockerd.sock"))
    with pytest.raises(PermanentError) as err:
        await configure_cri_dockerd(bare)
    assert err.value.code == "cri_dockerd_missing" and "install cri-dockerd" in err.value.message


async def test_kubelet_service_is_masked_and_stopped(ctx: StepContext) -> None:
    root = ctx.paths.root
    install_kubelet_package_units(root)
    stub = root / "usr/bin/kubelet"
    stub.write_text("#!/bin/sh\nexec sleep 120\n")
    stub.chmod(0o755)
    assert _systemctl(root, "start", "kubelet").returncode == 0
    assert _units(root)["kubelet.service"]["active"]

    progress = cast(ProgressLog, ctx.progress)
    await mask_kubelet_unit(ctx)
    await mask_kubelet_unit(ctx)  # idempotent
    assert progress.messages() == [
        "stopped kubelet.service (it was active): the service runs the kubelet itself",
        "masked kubelet.service: the service supervises the kubelet (kubeadm cannot start another)"]
    assert (root / "etc/systemd/system/kubelet.service").readlink() == Path("/dev/null")
    assert _systemctl(root, "is-active", "kubelet").stdout.strip() == "inactive"


async def test_a_kubelet_unit_file_of_its_own_is_refused(ctx: StepContext) -> None:
    own = ctx.paths.root / "etc/systemd/system/kubelet.service"
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_text("[Service]\nExecStart=/usr/bin/kubelet\n")
    with pytest.raises(PermanentError) as err:
        await mask_kubelet_unit(ctx)
    assert err.value.code == "kubelet_unit_conflict"
    assert own.read_text() == "[Service]\nExecStart=/usr/bin/kubelet\n"
