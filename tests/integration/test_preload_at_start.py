"""`serve` loads the Kubernetes client at start, while nothing is asked of it: an install that loaded it on its
first connect had a thread holding the GIL through its kubeadm and kubelet steps, and the events published
meanwhile waited for it (issue 11, bench_event_latency). Real Mosquitto, the real service in this process."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from lifecycle_fakes import NullKube, eventually, null_ports
from lifecycle_mqtt import probe, service_config, service_in_process, unique_prefix


async def test_the_kubernetes_client_is_loaded_at_start_before_any_request(tmp_path: Path) -> None:
    ports = null_ports()
    kube = cast(NullKube, ports.kube)
    config = service_config(tmp_path / "root", prefix=unique_prefix("preload"))
    async with service_in_process(config, ports=ports) as svc, probe(svc.topics) as p:
        await p.ready()
        await eventually(lambda: kube.preloads >= 1, timeout_s=5.0)
        assert kube.preloads == 1  # once: the boot's own preload runs only on a boot into `running`
        assert p.events() == []  # nothing was asked: no job ran
