"""The helper pod local-path-provisioner runs to create or remove a volume's directory on its node: the
ConfigMap's helperPod.yaml template with the node's parent directory as a hostPath volume, the setup/teardown
script as a ConfigMap volume at /script, VOL_DIR/VOL_MODE/VOL_SIZE_BYTES in its env, restartPolicy Never, bound
to the node by spec.nodeName; the provisioner waits for phase Succeeded (up to cmdTimeoutSeconds) and deletes
the pod either way.

Follows rancher/local-path-provisioner v0.0.37 provisioner.go createHelperPod (names, volumes, env, args, the
`create process timeout after N seconds` error, the `failed to <action> volume <name>` wrapping).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import time
from pathlib import PurePosixPath
from typing import Any

import yaml

from simnode.kubeclient import ApiError, KubeClient

log = logging.getLogger("local-path-provisioner")

SCRIPT_DIR = "/script"
NAME_MAX = 128  # HelperPodNameMaxLength
POLL_S = 0.5  # upstream polls every second
DEFAULT_TIMEOUT_S = 120  # defaultCmdTimeoutSeconds
_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|k|m)?$")
_FACTORS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


class HelperError(Exception):
    pass


def quantity_bytes(value: str) -> int:
    """resource.Quantity.Value() for the storage sizes claims use ("128Mi", "1G", "500")."""
    m = _QUANTITY.match(value.strip())
    if not m or m.group(2) == "m":
        return 0
    return int(float(m.group(1)) * _FACTORS[m.group(2) or ""])


class HelperPods:
    def __init__(self, client: KubeClient, *, namespace: str, service_account: str, config_map: str,
                 template_yaml: str, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
        self.client = client
        self.namespace = namespace
        self.service_account = service_account
        self.config_map = config_map
        template = yaml.safe_load(template_yaml)
        if not isinstance(template, dict) or not (template.get("spec") or {}).get("containers"):
            raise HelperError("helperPod.yaml: expected a Pod with one container")
        self.template = template
        self.timeout_s = timeout_s

    def pod(self, action: str, *, volume: str, path: str, node: str, size: str, mode: str) -> dict[str, Any]:
        parent, volume_dir = str(PurePosixPath(path).parent), PurePosixPath(path).name
        pod = copy.deepcopy(self.template)
        spec = pod.setdefault("spec", {})
        container = spec["containers"][0]
        mounts = container.setdefault("volumeMounts", [])
        mounts += [{"name": "data", "mountPath": parent}, {"name": "script", "mountPath": SCRIPT_DIR}]
        spec.setdefault("volumes", [])
        spec["volumes"] += [
            {"name": "data", "hostPath": {"path": parent, "type": "DirectoryOrCreate"}},
            {"name": "script", "configMap": {"name": self.config_map, "items": [
                {"key": "setup", "path": "setup"}, {"key": "teardown", "path": "teardown"}]}},
        ]
        name = f"{(pod.get('metadata') or {}).get('name', 'helper-pod')}-{action}-{volume}"[:NAME_MAX]
        pod["apiVersion"], pod["kind"] = "v1", "Pod"
        pod["metadata"] = {**(pod.get("metadata") or {}), "name": name, "namespace": self.namespace}
        if node and not spec.get("nodeName"):
            spec["nodeName"] = node
        spec["serviceAccountName"] = self.service_account
        spec["restartPolicy"] = "Never"
        if spec.get("tolerations") is None:
            spec["tolerations"] = [{"key": "node.kubernetes.io/disk-pressure", "operator": "Exists",
                                    "effect": "NoSchedule"}]
        container["command"] = ["/bin/sh", f"{SCRIPT_DIR}/{'setup' if action == 'create' else 'teardown'}"]
        container["env"] = [*(container.get("env") or []),
                            {"name": "VOL_DIR", "value": f"{parent.rstrip('/')}/{volume_dir}"},
                            {"name": "VOL_MODE", "value": mode},
                            {"name": "VOL_SIZE_BYTES", "value": str(quantity_bytes(size))},
                            {"name": "VOL_USER", "value": ""}, {"name": "VOL_GROUP", "value": ""},
                            {"name": "VOL_PERM", "value": ""}]
        container["args"] = ["-p", path, "-s", str(quantity_bytes(size)), "-m", mode, "-a", action]
        return pod

    async def run(self, action: str, *, volume: str, path: str, node: str, size: str = "0",
                  mode: str = "Filesystem") -> None:
        """Create the helper pod, wait for it to succeed, delete it; HelperError with upstream's words."""
        pod = self.pod(action, volume=volume, path=path, node=node, size=size, mode=mode)
        name = pod["metadata"]["name"]
        base = f"/api/v1/namespaces/{self.namespace}/pods"
        log.info("create the helper pod %s into %s", name, self.namespace)
        try:
            await self.client.create(base, pod)
        except ApiError as exc:
            if exc.status != 409:  # left by an earlier attempt: it is cleaned up below
                raise HelperError(f"failed to {action} volume {volume}: {exc.message}") from exc
        try:
            await self._wait_succeeded(base, name, action=action, volume=volume)
        finally:
            try:
                await self.client.delete(f"{base}/{name}")
            except ApiError as exc:
                if exc.status != 404:
                    log.error("unable to delete the helper pod: %s", exc.message)  # noqa: TRY400 (expected condition: no traceback)
        log.info("Volume %s has been %sd on %s:%s", volume, action, node, path)

    async def _wait_succeeded(self, base: str, name: str, *, action: str, volume: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                current = await self.client.get(f"{base}/{name}")
            except ApiError as exc:
                raise HelperError(f"failed to {action} volume {volume}: {exc.message}") from exc
            if (current.get("status") or {}).get("phase") == "Succeeded":
                return
            await asyncio.sleep(POLL_S)
        raise HelperError(f"failed to {action} volume {volume}: create process timeout after {self.timeout_s} "
                          "seconds")
