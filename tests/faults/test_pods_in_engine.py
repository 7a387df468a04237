"""Issue 9, parts 3 and 4, from outside: pods created with kubectl run from their images in the Docker Engine on
the simulated node, a NodePort Service answers through the kube-proxy stand-in, and images built on the node's
engine run without a push (imagePullPolicy Never) while `Always` on them fails as the real kubelet fails.

Replicas: each pod not on the host network gets a network namespace of its own in the engine, so two replicas
listen on the same containerPort (8080) without a clash; the kube-proxy stand-in reaches each inside its
namespace. The test image (simnode/httpimage.py) answers with its hostname, which is the pod's name.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import SimImages
from faultlib import Node, _wait_state, make_node, payload

from simnode import versions as v

__all__ = ["make_node"]  # the fixture, used by name


def _until(what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (subprocess.CalledProcessError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout_s} s; last: {last!r}")


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=120).stdout


def _pods(node: Node, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(node.kubectl("get", "pods", "-l", selector, "-o", "json"))["items"]
    return items


def _running(node: Node, selector: str, count: int) -> list[str]:
    def check() -> list[str]:
        pods = _pods(node, selector)
        ready = [p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running"
                 and not p["metadata"].get("deletionTimestamp")
                 and all(c.get("ready") for c in p["status"].get("containerStatuses") or [])]
        return sorted(ready) if len(ready) == count == len(pods) else []
    names: list[str] = _until(f"{count} running pod(s) {selector}", check)
    return names


def _engine_containers(node: Node, **labels: str) -> list[dict[str, str]]:
    filters = [f"--filter=label=io.simnode.root={node.root}", *(f"--filter=label={k}={val}" for k, val in
                                                                labels.items())]
    out = _docker("ps", "-a", *filters, "--format", "{{json .}}")
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [{kv.partition("=")[0]: kv.partition("=")[2] for kv in r["Labels"].split(",")} | {"State": r["State"]}
            for r in rows]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode()).strip()


def _waiting_reason(node: Node, pod: str) -> str:
    status = json.loads(node.kubectl("get", "pod", pod, "-o", "json"))["status"]
    return str(((status.get("containerStatuses") or [{}])[0].get("state") or {}).get("waiting", {}).get("reason", ""))


def _pod_manifest(name: str, image: str, policy: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                       "spec": {"containers": [{"name": "app", "image": image, "imagePullPolicy": policy,
                                                "env": [{"name": "PORT", "value": "18080"}]}]}})


def test_pods_run_in_the_engine_answer_on_a_node_port_and_local_images_follow_the_pull_policy(
    make_node: Callable[..., Node], sim_images: SimImages, tmp_path: Path
) -> None:
    node = make_node()
    events = node.install_until_running("pods-1")

    # Part 3: a Deployment's pod runs from its image in the engine, labelled as cri-dockerd labels it.
    image = v.http_echo_image(sim_images.repo)
    node.kubectl("create", "deployment", "web", f"--image={image}", "--port=8080")
    [first] = _running(node, "app=web", 1)
    [row] = _until("the pod's container in the engine",
                   lambda: [r for r in _engine_containers(node, **{"io.kubernetes.pod.name": first})
                            if r["State"] == "running"])
    assert row["io.kubernetes.pod.namespace"] == "default" and row["io.kubernetes.container.name"] == "http-echo"

    node.kubectl("expose", "deployment", "web", "--type=NodePort", "--port=8080")
    node_port = json.loads(node.kubectl("get", "svc", "web", "-o", "json"))["spec"]["ports"][0]["nodePort"]
    url = f"http://127.0.0.1:{node_port}/"
    assert _until("an answer on the node port", lambda: _get(url)) == first

    # Two replicas, both on containerPort 8080 (each in its own network namespace): answers from both.
    node.kubectl("scale", "deployment", "web", "--replicas=2")
    both = _running(node, "app=web", 2)
    _until("answers from both replicas", lambda: set(both) <= {_get(url) for _ in range(6)})

    # Deleting the Deployment removes the pods' containers from the engine.
    node.kubectl("delete", "deployment", "web")
    _until("the containers removed", lambda: not _engine_containers(node, **{"io.kubernetes.pod.namespace": "default"}))

    # Part 4: an image built on the node's engine runs with Never; Always on it is ErrImagePull; Never on an
    # absent image is ErrImageNeverPull.
    tag = f"pods-local-{uuid.uuid4().hex[:8]}:dev"
    (tmp_path / "Dockerfile").write_text(f"FROM {image}\nENV POD_NAME=built-locally\n")
    _docker("build", "-q", "-t", tag, str(tmp_path))
    try:
        for name, ref, policy in (("never", tag, "Never"), ("always", tag, "Always"),
                                  ("absent", f"{tag}-absent", "Never")):
            subprocess.run(["kubectl", "--kubeconfig", str(node.root / "etc/kubernetes/admin.conf"), "apply", "-f",
                            "-"], input=_pod_manifest(name, ref, policy), text=True, check=True, timeout=60)
        _until("the Never pod Running", lambda: json.loads(node.kubectl("get", "pod", "never", "-o", "json"))
               ["status"].get("phase") == "Running")
        _until("ErrImagePull for Always", lambda: _waiting_reason(node, "always") in ("ErrImagePull",
                                                                                      "ImagePullBackOff"))
        _until("ErrImageNeverPull", lambda: _waiting_reason(node, "absent") == "ErrImageNeverPull")
        # A reset stops every pod container in the engine.
        assert _engine_containers(node, **{"io.kubernetes.pod.name": "never"})
        assert payload(node.request({"id": "pods-2", "action": "reset"}, correlation="pods-2"))["ok"]
        last = _wait_state(events, "idle", timeout_s=120, request_id="pods-2")
        assert last["data"]["to"] == "idle", node.log_path.read_text()[-3000:]
        assert not _engine_containers(node)
    finally:
        leftovers = _docker("ps", "-aq", f"--filter=label=io.simnode.root={node.root}").split()
        if leftovers:
            subprocess.run(["docker", "rm", "-f", *leftovers], check=False, capture_output=True)
        subprocess.run(["docker", "rmi", "-f", tag], check=False, capture_output=True)


def test_a_load_balancer_service_answers_on_localhost_through_lifecycle_forward(
    make_node: Callable[..., Node], sim_images: SimImages
) -> None:
    """Issue 9's first check end to end: a Deployment exposed as a LoadBalancer Service is listed in the retained
    `exposures` within 2 s, shows `localhost` as EXTERNAL-IP, and answers on 127.0.0.1:<port> through `lifecycle
    forward` with the pod's name (from both pods once scaled to 2); deleting the Service closes the port."""
    from test_exposures_over_mqtt import LIFECYCLE, exposures_of, free_tcp_port, wait_external_ip

    node = make_node()
    node.install_until_running("lb-1")
    exposures = node.subscribe("exposures")
    node.kubectl("create", "deployment", "web", f"--image={v.http_echo_image(sim_images.repo)}", "--port=8080")
    [first] = _running(node, "app=web", 1)

    port = free_tcp_port()  # 8080 may be taken on a shared machine
    forward_log = node.log_path.with_name("forward.log")
    with open(forward_log, "wb") as out:
        forward = subprocess.Popen([str(LIFECYCLE), "forward", "--config", str(node.config_path), "--node", node.name],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        exposed_at = time.monotonic()
        node.kubectl("expose", "deployment", "web", "--type=LoadBalancer", f"--port={port}", "--target-port=8080")
        listed = exposures.wait_for(lambda m: any(e["port"] == port for e in payload(m)["exposures"]), timeout_s=5)
        took_s = time.monotonic() - exposed_at
        assert took_s < 2.0, f"the exposure took {took_s:.2f} s"
        [entry] = exposures_of(listed)
        assert (entry["service"], entry["protocol"], entry["conflict"]) == ("web", "TCP", None)
        wait_external_ip(node, "web", "localhost", timeout_s=2)

        url = f"http://127.0.0.1:{port}/"
        assert _until("an answer through lifecycle forward", lambda: _get(url)) == first, forward_log.read_text()
        node.kubectl("scale", "deployment", "web", "--replicas=2")
        both = _running(node, "app=web", 2)
        _until("answers from both replicas through lifecycle forward",
               lambda: set(both) <= {_get(url) for _ in range(6)})

        node.kubectl("delete", "svc", "web")
        exposures.wait_for(lambda m: payload(m)["exposures"] == [], timeout_s=5)

        def closed() -> bool:
            try:
                _get(url)
            except OSError:
                return True
            return False
        _until("the host port closed", closed, timeout_s=5)
    finally:
        forward.terminate()
        forward.wait(timeout=10)
        node.kubectl("delete", "deployment", "web", "--ignore-not-found")
        leftovers = _docker("ps", "-aq", f"--filter=label=io.simnode.root={node.root}").split()
        if leftovers:
            subprocess.run(["docker", "rm", "-f", *leftovers], check=False, capture_output=True)
