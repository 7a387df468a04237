"""DockerEngine.stop_containers against the real Docker Engine (the stop of issue 10 part 2 stops a real node's
pod containers by cri-dockerd's `io.kubernetes.pod.namespace` label): only the matching running containers
are stopped, and they are kept."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

from conftest import SimImages

from lifecycle.adapters.docker import DockerEngine


def _docker(docker_host: str, *args: str) -> str:
    return subprocess.run(["docker", *args], env={**os.environ, "DOCKER_HOST": docker_host}, capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()


async def test_stop_containers_stops_only_the_labelled_running_ones_and_keeps_them(
    docker_host: str, sim_images: SimImages,
) -> None:
    image = f"{sim_images.repo}/simnode/http-echo:1"  # a real program that runs until stopped
    _docker(docker_host, "pull", "-q", image)
    namespace = f"stop-test-{uuid.uuid4().hex[:8]}"
    pod = _docker(docker_host, "run", "-d", "--label", f"io.kubernetes.pod.namespace={namespace}", image)
    other = _docker(docker_host, "run", "-d", "--label", f"io.kubernetes.pod.namespace={namespace}-other", image)
    engine = DockerEngine(docker_host)
    try:
        stopped = await engine.stop_containers([f"io.kubernetes.pod.namespace={namespace}"], timeout_s=1)
        assert stopped == [pod]
        state = json.loads(_docker(docker_host, "inspect", pod))[0]["State"]
        assert state["Running"] is False  # stopped, not removed: the kubelet re-creates pods itself
        assert json.loads(_docker(docker_host, "inspect", other))[0]["State"]["Running"] is True
        assert await engine.stop_containers([f"io.kubernetes.pod.namespace={namespace}"], timeout_s=1) == []
    finally:
        await engine.close()
        _docker(docker_host, "rm", "-f", pod, other)
