"""The simulated kubelet's engine side (issue 9, parts 3 and 4), in pieces: how a pod's container becomes a
Docker Engine container config (kuberuntime_container.go + cri-dockerd), and imagePullPolicy against the real
engine (image_manager.go). The whole path (kubectl, node port, curl) is tests/e2e/test_pods_in_engine.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from simnode.kubelet.docker import DockerRuntime, refresh_images
from simnode.kubelet.engine import EngineRunner, expand
from simnode.kubelet.pods import ContainerSim, PodSim, containers_from_spec
from simnode.paths import NodeRoot


def _pod(container: dict[str, Any], *, host_network: bool = False) -> PodSim:
    return PodSim(namespace="shop", name="web-1", uid="u-1", containers=containers_from_spec(
        {"containers": [container]}), host_network=host_network, ip="10.244.0.7")


def _config(container: dict[str, Any], *, host_network: bool = False) -> dict[str, Any]:
    runner = EngineRunner(NodeRoot(Path("/nodes/a")), DockerRuntime(Path("/nonexistent.sock")))
    pod = _pod(container, host_network=host_network)
    c = pod.containers[0]
    return runner._config(pod, c, runner._network(pod, (pod.uid, c.name)))


def test_command_and_args_replace_entrypoint_and_cmd_as_cri_dockerd_does() -> None:
    base = {"name": "app", "image": "myapp:dev"}
    assert "Entrypoint" not in _config(base) and "Cmd" not in _config(base)  # the image's own
    only_args = _config({**base, "args": ["--port", "9000"]})
    assert "Entrypoint" not in only_args and only_args["Cmd"] == ["--port", "9000"]
    only_command = _config({**base, "command": ["/bin/app"]})
    assert only_command["Entrypoint"] == ["/bin/app"] and only_command["Cmd"] is None  # image Cmd dropped
    both = _config({**base, "command": ["/bin/app"], "args": ["-v"], "workingDir": "/srv"})
    assert (both["Entrypoint"], both["Cmd"], both["WorkingDir"]) == (["/bin/app"], ["-v"], "/srv")


def test_env_fieldrefs_and_var_expansion() -> None:
    cfg = _config({"name": "app", "image": "myapp:dev", "args": ["--name=$(POD_NAME)", "$$(KEEP)", "$(UNSET)"],
                   "env": [{"name": "PORT", "value": "9000"},
                           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                           {"name": "URL", "value": "http://x:$(PORT)/"}]})
    assert cfg["Env"] == ["PORT=9000", "POD_NAME=web-1", "URL=http://x:9000/"]
    assert cfg["Cmd"] == ["--name=web-1", "$(KEEP)", "$(UNSET)"]
    assert expand("$(A)$(B)$$", {"A": "1"}) == "1$(B)$"


def test_labels_ports_and_network() -> None:
    cfg = _config({"name": "app", "image": "myapp:dev", "ports": [{"containerPort": 8080}]})
    assert cfg["Labels"] == {
        "io.kubernetes.pod.name": "web-1", "io.kubernetes.pod.namespace": "shop", "io.kubernetes.pod.uid": "u-1",
        "io.kubernetes.container.name": "app", "io.kubernetes.docker.type": "container",
        "annotation.io.kubernetes.container.restartCount": "0", "io.simnode.root": "/nodes/a"}
    assert cfg["ExposedPorts"] == {"8080/tcp": {}}
    assert cfg["HostConfig"] == {"NetworkMode": "none"} and cfg["Hostname"] == "web-1"
    host = _config({"name": "app", "image": "myapp:dev"}, host_network=True)
    assert host["HostConfig"] == {"NetworkMode": "host"} and "Hostname" not in host


def test_pull_policy_on_a_locally_built_image(docker_host: str) -> None:
    tag = f"pods-policy-{uuid.uuid4().hex[:8]}:dev"
    env = {**os.environ, "DOCKER_HOST": docker_host, "DOCKER_BUILDKIT": "0"}
    subprocess.run(["docker", "build", "-q", "-t", tag, "-"], input=b"FROM scratch\nLABEL x=y\n", env=env,
                   check=True, capture_output=True)
    runtime = DockerRuntime(Path(docker_host.removeprefix("unix://")))

    async def status(image: str, policy: str) -> ContainerSim:
        [c] = containers_from_spec({"containers": [{"name": "a", "image": image, "imagePullPolicy": policy}]})
        await refresh_images(runtime, [c], 0.0, pull_policy=True)
        return c

    async def run() -> None:
        try:
            for policy in ("Never", "IfNotPresent"):
                assert (await status(tag, policy)).image_id, policy  # no push, no pull
            always = await status(tag, "Always")
            assert always.image_id is None and always.image_error_reason(0.0) == "ErrImagePull"
            assert always.image_error.startswith(f'Failed to pull image "{tag}": ')
            assert always.image_error_reason(5.0) == "ImagePullBackOff"
            never = await status(f"{tag}-absent", "Never")
            assert never.image_id is None and never.image_error_reason(5.0) == "ErrImageNeverPull"
            assert never.image_error == f'Container image "{tag}-absent" is not present with pull policy of Never'
        finally:
            await runtime.close()

    try:
        asyncio.run(run())
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], env=env, check=False, capture_output=True)
