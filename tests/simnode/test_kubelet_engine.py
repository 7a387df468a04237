"""The simulated kubelet's engine side (issue 9, parts 3 and 4), in pieces: how a pod's container becomes a
Docker Engine container config (kuberuntime_container.go + cri-dockerd), and imagePullPolicy against the real
engine (image_manager.go). The whole path (kubectl, node port, curl) is tests/e2e/test_pods_in_engine.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SimImages
from test_kubelet_support import (
    CONTROL_PLANE_IMAGES,
    Cluster,
    pod_is_ready,
    running_cluster,
    scratch_images,
    wait_for,
    waiting_reason,
)

from simnode import versions as v
from simnode.httpimage import http_echo_tree
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


# --- on a running simulated control plane: restarts, adoption across a kubelet restart, removal ---------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, sim_images: SimImages) -> Iterator[Cluster]:
    with scratch_images(CONTROL_PLANE_IMAGES) as images, running_cluster(
        tmp_path_factory.mktemp("kubelet-engine") / "node", images
    ) as c:
        try:
            yield c
        finally:
            leftovers = subprocess.run(["docker", "ps", "-aq", f"--filter=label=io.simnode.root={c.root}"],
                                       capture_output=True, text=True, check=False).stdout.split()
            if leftovers:
                subprocess.run(["docker", "rm", "-f", *leftovers], check=False, capture_output=True)


def _engine(cluster: Cluster, pod: str) -> list[tuple[str, str, str]]:
    """(container id, attempt label, state) of the pod's containers in the engine."""
    out = subprocess.run(["docker", "ps", "-a", "--no-trunc", f"--filter=label=io.simnode.root={cluster.root}",
                          f"--filter=label=io.kubernetes.pod.name={pod}", "--format",
                          '{{.ID}} {{.Label "annotation.io.kubernetes.container.restartCount"}} {{.State}}'],
                         capture_output=True, text=True, check=True).stdout
    return sorted(tuple(line.split()) for line in out.splitlines() if line.strip())  # type: ignore[misc]


def _pod_body(name: str, image: str, **container: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
                                                            "labels": {"app": "echo"}},
            "spec": {"nodeName": "node1", "containers": [{"name": "main", "image": image, **container}]}}


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode()).strip()


def _answers(url: str, tries: int) -> set[str]:
    out = set()
    for _ in range(tries):
        with contextlib.suppress(OSError):
            out.add(_get(url))
    return out


def test_two_pods_on_one_containerport_answer_round_robin_on_the_node_port(
    cluster: Cluster, sim_images: SimImages
) -> None:
    """Each pod has a network namespace of its own, so both listen on 8080; the kube-proxy stand-in forwards
    the node port to each in turn. A pod that is not Ready gets no traffic."""
    image = v.http_echo_image(sim_images.repo)
    port = {"ports": [{"containerPort": 8080}]}
    for name in ("echo-a", "echo-b"):
        cluster.apply(_pod_body(name, image, **port))
    cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "default"},
                   "spec": {"type": "NodePort", "selector": {"app": "echo"}, "ports": [{"port": 80,
                                                                                         "targetPort": 8080}]}})
    try:
        for name in ("echo-a", "echo-b"):
            cluster.wait_pod(name, pod_is_ready, namespace="default", timeout_s=30, what=f"{name} Ready")
        node_port = cluster.get("svc", "echo")["spec"]["ports"][0]["nodePort"]
        url = f"http://127.0.0.1:{node_port}/"
        wait_for(lambda: _answers(url, 4) == {"echo-a", "echo-b"}, timeout_s=20, what="answers from both pods")
        cluster.kubectl("delete", "pod", "echo-b", "--wait=false")
        wait_for(lambda: _answers(url, 4) == {"echo-a"}, timeout_s=20, what="only the remaining pod answers")
    finally:
        cluster.kubectl("delete", "svc", "echo", "--wait=false")
        cluster.kubectl("delete", "pod", "echo-a", "echo-b", "--wait=false", "--ignore-not-found")


def test_command_exit_is_a_restart_and_a_kubelet_restart_adopts_running_containers(
    cluster: Cluster, sim_images: SimImages
) -> None:
    image = v.http_echo_image(sim_images.repo)
    python = http_echo_tree()[2][0]
    cluster.apply(_pod_body("exits", image, command=[python, "-S", "-c", "raise SystemExit(3)"]))
    cluster.apply(_pod_body("steady", image, env=[{"name": "PORT", "value": "18181"}]))
    try:
        pod = cluster.wait_pod("exits", lambda p: waiting_reason(p) == "CrashLoopBackOff", namespace="default",
                               timeout_s=30, what="the command's exit seen as a crash")
        last = pod["status"]["containerStatuses"][0]["lastState"]["terminated"]
        assert last["exitCode"] == 3, last
        assert len(_engine(cluster, "exits")) == 1, "the previous attempt's container is replaced, not kept"

        cluster.wait_pod("steady", pod_is_ready, namespace="default", timeout_s=30, what="steady Ready")
        [(cid, attempt, state)] = _engine(cluster, "steady")
        assert (attempt, state) == ("0", "running")
        cluster.stop_kubelet(signal.SIGTERM)
        cluster.start_kubelet()
        wait_for(lambda: cluster.kubelet_log.read_text().count("registered at") >= 2, timeout_s=20,
                 what="the new kubelet's API session")
        time.sleep(3)  # a few sync passes and one engine sweep
        pod = cluster.wait_pod("steady", pod_is_ready, namespace="default", what="steady still Ready")
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
        assert pod["status"]["containerStatuses"][0]["containerID"] == f"docker://{cid}"
        assert _engine(cluster, "steady") == [(cid, "0", "running")], "adopted, not restarted or duplicated"
    finally:
        cluster.kubectl("delete", "pod", "exits", "steady", "--wait=false")
    wait_for(lambda: not _engine(cluster, "steady") and not _engine(cluster, "exits"), timeout_s=20,
             what="containers removed with their pods")
