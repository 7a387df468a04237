"""`lifecycle kubeconfig --merge` as a user runs it: the CLI process fetches the admin kubeconfig over the real
broker from the service (real certs step, test steps after it) and merges it into a kubeconfig holding two other
contexts; `kubectl` reads the result."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import yaml
from kubeconfigs import kubectl_view, names, two_contexts
from lifecycle_mqtt import probe, service_config, unique_prefix
from test_pki_bundle_requests import ENDPOINT, LIFECYCLE, NODE, certs_service

from lifecycle.config import Config


async def merge_cli(config: Config, *args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(LIFECYCLE), "kubeconfig", *args, "--broker", config.mqtt.broker, "--prefix", config.mqtt.prefix,
        "--node", config.node_name, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env})
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert out == b""  # the key never goes to stdout with --merge
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_merge_keeps_two_other_contexts_and_refuses_a_garbage_file(
    tmp_path: Path, mqtt_broker: tuple[str, int]
) -> None:
    config = service_config(tmp_path / "node", prefix=unique_prefix("merge"), node=NODE)
    kube = tmp_path / "kube"
    kube.mkdir()
    target, garbage = kube / "config", kube / "garbage"
    target.write_text(yaml.safe_dump(two_contexts(), sort_keys=False))
    garbage.write_bytes(b"\x00not: [a kubeconfig\n")
    async with certs_service(config) as svc, probe(svc.topics) as p:
        await p.ready()
        reply = await p.ask({"id": "i-1", "action": "install"})
        assert reply["ok"], reply
        await p.wait_state("running", timeout_s=30)

        # --merge without FILE: kubectl's default file, the first existing one of $KUBECONFIG.
        code, err = await merge_cli(config, "--merge", "--use",
                                    env={"KUBECONFIG": f"{kube / 'absent'}:{target}", "HOME": str(tmp_path)})
        assert code == 0 and f"merged context docker-desktop into {target}" in err, err
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        view = kubectl_view(target)
        assert names(view, "contexts") == ["docker-desktop", "kind-dev", "prod"]
        assert view["current-context"] == "docker-desktop"
        ours = kubectl_view(target, "--context", "docker-desktop", "--minify", "--raw")
        assert ours["clusters"][0]["cluster"]["server"].startswith(f"https://{ENDPOINT}:")
        assert ours["users"][0]["user"]["client-key-data"]  # the admin credentials came along
        assert kubectl_view(target, "--context", "prod", "--minify")["clusters"][0]["cluster"]["server"] == (
            "https://prod:6443")
        assert yaml.safe_load((kube / "config.lifecycle-backup").read_text()) == two_contexts()

        before = garbage.read_bytes()
        code, err = await merge_cli(config, "--merge", str(garbage), env={})
        assert code == 1 and "not YAML" in err and "nothing was changed" in err, err
        assert garbage.read_bytes() == before
        assert sorted(p.name for p in kube.iterdir()) == ["config", "config.lifecycle-backup", "garbage"]
