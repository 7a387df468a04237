"""The simulated cri-dockerd CNI plugin against files in a temp root: which config it loads (libcni's order and
checks), when NetworkReady is false and how the kubelet words it, and what a pod sandbox still needs."""

from __future__ import annotations

import json
from pathlib import Path

from simnode.images import cni_plugin_stand_in
from simnode.kubelet.cni import CniPlugin, runtime_network_error
from simnode.paths import NodeRoot

NOT_READY = ("container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady "
             "message:docker: network plugin is not ready: cni config uninitialized")


def _plugins(root: Path, *names: str, mode: int = 0o755) -> None:
    bin_dir = root / "opt/cni/bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        (bin_dir / name).write_bytes(cni_plugin_stand_in(name, "v1.6.0"))
        (bin_dir / name).chmod(mode)


def _conf(root: Path, name: str, doc: object) -> Path:
    path = root / "etc/cni/net.d" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _conflist(name: str, *types: str, version: str = "1.0.0") -> dict[str, object]:
    return {"cniVersion": version, "name": name,
            "plugins": [{"type": t, **({"ipam": {"type": "host-local"}} if t == "bridge" else {})} for t in types]}


async def test_no_config_means_network_not_ready_in_the_kubelets_words(tmp_path: Path) -> None:
    cni = CniPlugin(NodeRoot(tmp_path))
    await cni.sync()
    assert cni.network is None
    assert cni.error() == NOT_READY == runtime_network_error(None)
    assert cni.sandbox_error() == "cni config uninitialized"


async def test_the_first_valid_config_in_name_order_wins(tmp_path: Path) -> None:
    _plugins(tmp_path, "bridge", "host-local", "portmap", "loopback")
    _conf(tmp_path, "05-broken.conflist", "{not json")
    _conf(tmp_path, "06-empty.conflist", {"cniVersion": "1.0.0", "name": "empty", "plugins": []})
    _conf(tmp_path, "07-missing-plugin.conflist", _conflist("flannel", "flannel"))
    _conf(tmp_path, "08-old-version.conflist", _conflist("ancient", "bridge", version="0.2.0"))
    _conf(tmp_path, "09-conf-without-type.conf", {"cniVersion": "1.0.0", "name": "x"})
    _conf(tmp_path, "README.md", "not a config")
    _conf(tmp_path, "20-second.conflist", _conflist("second", "bridge"))
    _conf(tmp_path, "10-first.conflist", _conflist("first", "bridge", "portmap"))
    cni = CniPlugin(NodeRoot(tmp_path))
    await cni.sync()
    assert cni.network is not None
    assert (cni.network.name, cni.network.file) == ("first", "/etc/cni/net.d/10-first.conflist")
    assert cni.network.plugin_types == ("bridge", "portmap") and cni.network.ipam_types == ("host-local",)
    assert cni.error() is None and cni.sandbox_error() is None


async def test_a_single_conf_file_is_a_list_of_one(tmp_path: Path) -> None:
    _plugins(tmp_path, "bridge", "host-local", "loopback")
    _conf(tmp_path, "10-bridge.conf", {"cniVersion": "0.4.0", "name": "br", "type": "bridge",
                                       "ipam": {"type": "host-local"}})
    cni = CniPlugin(NodeRoot(tmp_path))
    await cni.sync()
    assert cni.network is not None and cni.network.plugin_types == ("bridge",)


async def test_plugins_must_exist_and_be_executable(tmp_path: Path) -> None:
    _plugins(tmp_path, "host-local", "portmap", "loopback")
    _plugins(tmp_path, "bridge", mode=0o644)  # present but libcni cannot exec it for VERSION
    _conf(tmp_path, "10-lifecycle.conflist", _conflist("lifecycle", "bridge", "portmap"))
    cni = CniPlugin(NodeRoot(tmp_path))
    await cni.sync()
    assert cni.network is None and cni.error() == NOT_READY
    _plugins(tmp_path, "bridge")
    await cni.sync()
    assert cni.network is not None and cni.error() is None


async def test_a_loaded_network_stays_until_restart_and_a_sandbox_needs_loopback(tmp_path: Path) -> None:
    _plugins(tmp_path, "bridge", "host-local", "portmap", "loopback")
    conf = _conf(tmp_path, "10-lifecycle.conflist", _conflist("lifecycle", "bridge", "portmap"))
    cni = CniPlugin(NodeRoot(tmp_path))
    await cni.sync()
    conf.unlink()
    await cni.sync()
    assert cni.network is not None and cni.error() is None  # cri-dockerd keeps what it loaded
    (tmp_path / "opt/cni/bin/loopback").unlink()
    assert cni.sandbox_error() is not None and "loopback" in str(cni.sandbox_error())
    restarted = CniPlugin(NodeRoot(tmp_path))
    await restarted.sync()
    assert restarted.error() == NOT_READY
