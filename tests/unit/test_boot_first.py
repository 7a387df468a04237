"""The boot's first step (issue 10 part 3, lifecycle.__main__ `boot_first`): with the saved state `running`, the
kubelet is exec'd before `lifecycle serve` has imported the rest of itself (the MQTT, Docker and Kubernetes clients,
cryptography, the engine); in any other state, or when the kubelet binary is not as its last full check left it,
nothing is started early (the engine's walk decides, as before)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lifecycle_fakes import make_config, write_config

from lifecycle.__main__ import boot_first
from lifecycle.adapters.kubelet import ProcessKubeletSupervisor
from lifecycle.logging import get_logger
from lifecycle.paths import HostPaths
from lifecycle.statefile import state_file
from lifecycle.step import ClusterParams
from lifecycle.store import Snapshot
from states.binaries import EVIDENCE_NAME

# What the service imports for itself; none of it may stand between a reboot and the kubelet's exec.
LATER = ("aiomqtt", "paho", "aiodocker", "aiohttp", "kubernetes_asyncio", "prometheus_client", "cryptography",
         "yaml", "lifecycle.service", "lifecycle.engine", "lifecycle.adapters.mqtt", "lifecycle.adapters.docker",
         "states.certs", "states.images", "states.readiness")


def installed_node(root: Path, *, state: str) -> HostPaths:
    """What an install leaves that the kubelet's start reads: the saved state, the kubelet binary (a stand-in that
    sleeps) with its boot evidence, and kubeadm's flags file."""
    paths = HostPaths(root)
    kubelet = paths.binary("kubelet")
    kubelet.parent.mkdir(parents=True)
    kubelet.write_text("#!/bin/sh\nexec sleep 30\n")
    kubelet.chmod(0o755)
    st = kubelet.stat()
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    files = {"/usr/bin/kubelet": {"size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns}}
    (paths.state_dir / EVIDENCE_NAME).write_text(json.dumps({"image_id": "sha256:0", "files": files}))
    paths.kubeadm_flags_env.parent.mkdir(parents=True, exist_ok=True)
    paths.kubeadm_flags_env.write_text('KUBELET_KUBEADM_ARGS="--node-ip=127.0.0.1"\n')
    cluster = ClusterParams(kubernetes_version="v1.31.4", api_port=6443, kubelet_healthz_port=10248)
    state_file(paths).save(Snapshot(state=state, since=time.time(), seq=1, cluster=cluster))
    return paths


def _end(pid_file: Path) -> None:
    if pid_file.exists():
        pid = json.loads(pid_file.read_text())["pid"]
        os.killpg(pid, signal.SIGKILL)  # its own session: the stand-in kubelet and only it


def test_a_boot_execs_the_kubelet_before_the_service_imports_the_rest_of_itself(tmp_path: Path) -> None:
    paths = installed_node(tmp_path / "root", state="running")
    config = write_config(tmp_path / "lifecycle.toml", root=paths.root, node="boot-first", prefix="t",
                          broker="mqtt://127.0.0.1:1")
    # The real `lifecycle serve`, stopped right after the kubelet's spawn: what was imported by then is printed.
    probe = textwrap.dedent(f"""
        import json, os, sys
        from lifecycle.adapters.kubelet import ProcessKubeletSupervisor
        spawn = ProcessKubeletSupervisor.start_now
        def start_now(self, *args, **kwargs):
            started = spawn(self, *args, **kwargs)
            print(json.dumps({{"started": started, "modules": sorted(sys.modules)}}), flush=True)
            os._exit(0)
        ProcessKubeletSupervisor.start_now = start_now
        from lifecycle.__main__ import main
        main(["serve", "--config", {str(config)!r}])
        """)
    try:
        # Output to files: the kubelet's log pipe process shares the service's stderr and lives as long as it.
        with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
            code = subprocess.run([sys.executable, "-c", probe], stdout=out, stderr=err, timeout=60, check=False,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).returncode
        assert code == 0, (tmp_path / "err").read_text()
        seen = json.loads((tmp_path / "out").read_text().strip().splitlines()[-1])
        assert seen["started"] is True
        record = json.loads((paths.state_dir / "kubelet.pid").read_text())
        assert record["argv"][0] == str(paths.binary("kubelet"))  # the kubelet runs, recorded for the service
        loaded = [m for m in seen["modules"] if any(m == name or m.startswith(name + ".") for name in LATER)]
        assert loaded == [], f"imported before the kubelet's exec: {loaded}"
    finally:
        _end(paths.state_dir / "kubelet.pid")


@pytest.mark.parametrize("state", ["stopped", "idle", "kubelet", "failed"])
def test_nothing_is_started_early_unless_the_saved_state_is_running(tmp_path: Path, state: str) -> None:
    paths = installed_node(tmp_path, state=state)
    store = state_file(paths)
    supervisor = ProcessKubeletSupervisor(pid_file=paths.state_dir / "kubelet.pid", log=get_logger("test"))
    assert boot_first(make_config(tmp_path), store, supervisor) is False
    assert not (paths.state_dir / "kubelet.pid").exists()


def test_a_kubelet_binary_changed_since_its_last_check_is_left_to_the_boot_walk(tmp_path: Path) -> None:
    paths = installed_node(tmp_path, state="running")
    paths.binary("kubelet").write_text("#!/bin/sh\nexec sleep 31\n")  # another size: not what was hashed
    supervisor = ProcessKubeletSupervisor(pid_file=paths.state_dir / "kubelet.pid", log=get_logger("test"))
    try:
        assert boot_first(make_config(tmp_path), state_file(paths), supervisor) is False
        assert not (paths.state_dir / "kubelet.pid").exists()
    finally:
        _end(paths.state_dir / "kubelet.pid")
