"""The shipped config files load, name what they must, and a bad file is refused with its key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.config import STEP_NAMES, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_simnode_config_targets_the_local_services() -> None:
    config = load_config(REPO / "simnode" / "lifecycle.toml")
    k8s = config.kubernetes
    assert config.node_name == "simnode" and config.mqtt.broker == "mqtt://127.0.0.1:1883"
    assert sorted(k8s.versions) == ["v1.31.4", "v1.32.1"]
    assert k8s.images_for("v1.31.4")["etcd"] == "127.0.0.1:5000/etcd:3.5.15-0"
    assert k8s.images_for("v1.32.1")["etcd"] == "127.0.0.1:5000/etcd:3.5.16-0"
    assert k8s.images_for("v1.32.1")["coredns"] == "127.0.0.1:5000/coredns:v1.11.3"
    assert k8s.binaries_image_for("v1.32.1") == (
        "127.0.0.1:5000/desktop-kubernetes:kubernetes-v1.32.1-cni-v1.6.0-critools-v1.31.1-cri-dockerd-v0.3.16-1-debian"
    )
    assert k8s.addon_images == ()
    assert config.addons.images(k8s.image_repository) == {
        "STORAGE_PROVISIONER_IMAGE": "127.0.0.1:5000/rancher/local-path-provisioner:v0.0.37",
        "STORAGE_HELPER_IMAGE": "127.0.0.1:5000/library/busybox:1.37.0",
    }
    assert (k8s.api_port, k8s.kubelet_healthz_port, k8s.node_ip, k8s.endpoint_name) == (0, 0, "127.0.0.1", "localhost")
    assert k8s.cri_socket == config.docker.host == "unix:///tmp/lifecycle-services/docker/docker.sock"
    assert config.addons.manifests_dir == REPO / "deploy" / "addons"
    assert all(config.steps[name].timeout_s <= 600 for name in STEP_NAMES)


def test_two_nodes_from_one_file_differ_in_root_and_name() -> None:
    base = load_config(REPO / "simnode" / "lifecycle.toml")
    a = base.with_overrides(root=Path("/tmp/a"), node_name="node-a")
    b = base.with_overrides(root=Path("/tmp/b"), node_name="node-b", broker="mqtt://127.0.0.1:1884")
    assert (a.root, a.node_name, b.root, b.node_name) == (Path("/tmp/a"), "node-a", Path("/tmp/b"), "node-b")
    assert b.mqtt.port == 1884 and a.mqtt.port == 1883


def test_deploy_config_is_a_real_vm() -> None:
    config = load_config(REPO / "deploy" / "lifecycle.toml")
    k8s = config.kubernetes
    assert config.root == Path("/") and config.docker.host == "unix:///var/run/docker.sock"
    assert k8s.cri_socket == "unix:///var/run/cri-dockerd.sock"
    assert (k8s.api_port, k8s.kubelet_healthz_port) == (6443, 10248)
    assert k8s.endpoint_name == "kubernetes.docker.internal"
    assert k8s.node_ip == ""  # detected at install time: Docker Desktop's 192.168.65.3 is on no plain VM
    assert config.steps["preflight"].retries == 0
    assert config.exposures.host == "localhost"  # what Docker Desktop writes as a LoadBalancer's ingress
    assert (k8s.cluster_name, k8s.user_name, k8s.context_name) == ("docker-desktop",) * 3
    assert k8s.images_for("v1.31.4") == {
        "kube-apiserver": "registry.k8s.io/kube-apiserver:v1.31.4",
        "kube-controller-manager": "registry.k8s.io/kube-controller-manager:v1.31.4",
        "kube-scheduler": "registry.k8s.io/kube-scheduler:v1.31.4",
        "kube-proxy": "registry.k8s.io/kube-proxy:v1.31.4",
        "etcd": "registry.k8s.io/etcd:3.5.15-0",
        "coredns": "registry.k8s.io/coredns/coredns:v1.11.3",
        "pause": "registry.k8s.io/pause:3.10",
    }
    assert k8s.images_for("v1.32.1")["etcd"] == "registry.k8s.io/etcd:3.5.16-0"
    assert config.addons.images(k8s.image_repository) == {
        "STORAGE_PROVISIONER_IMAGE": "docker.io/rancher/local-path-provisioner:v0.0.37",
        "STORAGE_HELPER_IMAGE": "docker.io/library/busybox:1.37.0",
    }


def test_every_key_of_the_deploy_config_is_commented() -> None:
    lines = (REPO / "deploy" / "lifecycle.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            commented = "#" in line or lines[i - 1].lstrip().startswith("#")
            assert commented, f"line {i + 1} has no comment: {line}"


@pytest.mark.parametrize(
    ("snippet", "key"),
    [
        ('[mqtt]\nbroker = "http://x"', "mqtt.broker"),
        ('[mqtt]\nprefix = "a/#"', "mqtt.prefix"),
        ("[mqtt]\nkeepalive_s = 0", "mqtt.keepalive_s"),
        ('[kubernetes]\nversion = "v9.9.9"', "kubernetes.version"),
        ("[kubernetes]\napi_port = 70000", "kubernetes.api_port"),
        ("[steps.images]\ntimeout_s = -1", "steps.images.timeout_s"),
        ("[steps.upgrade]\ntimeout_s = 1", "steps.upgrade"),
        ("[node]\nname = \"Bad_Name\"", "node.name"),
        ("[mqtt]\nbrokr = \"mqtt://x\"", "mqtt.brokr"),
        ('[kubernetes]\nbinaries_image = "x/y:kubernetes-{version}-cni-{cnii}"', "kubernetes.binaries_image"),
        ('[kubernetes]\nbinaries_image = "x/y:{version"', "kubernetes.binaries_image"),
        ('[kubernetes]\nbinaries_image = "x/y:{version:>9}"', "kubernetes.binaries_image"),
        ('[kubernetes]\nbinaries = ["kubeadm"]', "kubernetes.binaries"),
        ('[kubernetes]\nbinaries = ["/usr/bin/../../etc/shadow"]', "kubernetes.binaries"),
        ('[kubernetes]\nbinaries = ["/opt/cni//bin/bridge"]', "kubernetes.binaries"),
        ('[kubernetes]\nbinaries = ["/usr/bin/kubeadm", "/usr/bin/kubeadm"]', "kubernetes.binaries"),
        ('[kubernetes]\nbinaries = []', "kubernetes.binaries"),
        ('[addons]\nstorage_provisioner_image = "rancher/local-path-provisioner"', "addons.storage_provisioner_image"),
        ('[addons]\nstorage_helper_image = ""', "addons.storage_helper_image"),
        ('[exposures]\nhost = "127.0.0.1"', "exposures.host"),
        ('[exposures]\nhost = "Local_Host"', "exposures.host"),
        ('[exposures]\nhost = ""', "exposures.host"),
        ('[exposures]\nhosts = "localhost"', "exposures.hosts"),
        ("[kubernetes]\nkubelet_log_max_bytes = 1000", "kubernetes.kubelet_log_max_bytes"),  # under 64 KiB
        ('[kubernetes]\nkubelet_log_max_bytes = "10MiB"', "kubernetes.kubelet_log_max_bytes"),
        ("[kubernetes]\nkubelet_log_files = 0", "kubernetes.kubelet_log_files"),
    ],
)
def test_a_bad_value_names_its_key(tmp_path: Path, snippet: str, key: str) -> None:
    versions = ('[kubernetes.versions."v1.31.4"]\netcd = "3.5.15-0"\ncoredns = "v1.11.3"\npause = "3.10"\n'
                'cni = "v1.6.0"\ncritools = "v1.31.1"\ncri_dockerd = "v0.3.16"\n')
    path = tmp_path / "bad.toml"
    path.write_text(f"{snippet}\n{versions}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{key}:")


def test_binaries_image_is_a_real_docker_desktop_tag_with_every_component_version(tmp_path: Path) -> None:
    k8s = load_config(REPO / "deploy" / "lifecycle.toml").kubernetes
    assert k8s.binaries_image_for("v1.31.4") == (
        "docker/desktop-kubernetes:kubernetes-v1.31.4-cni-v1.6.0-critools-v1.31.1-cri-dockerd-v0.3.16-1-debian"
    )
    assert k8s.binaries[:4] == ("/usr/bin/kubeadm", "/usr/bin/kubelet", "/usr/bin/kubectl", "/usr/bin/crictl")
    assert {"/opt/cni/bin/bridge", "/opt/cni/bin/host-local", "/opt/cni/bin/loopback", "/opt/cni/bin/portmap"} <= set(
        k8s.binaries)
    # A version that lacks a component the template names is refused, naming that version's key.
    path = tmp_path / "partial.toml"
    path.write_text('[kubernetes.versions."v1.31.4"]\netcd = "3.5.15-0"\ncoredns = "v1.11.3"\npause = "3.10"\n'
                    'cni = "v1.6.0"\ncri_dockerd = "v0.3.16"\n')
    with pytest.raises(ConfigError, match=r'^kubernetes.versions."v1.31.4".critools: missing '
                                          r"\(kubernetes.binaries_image uses \{critools\}\)"):
        load_config(path)


def test_missing_or_broken_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")
    (tmp_path / "broken.toml").write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")
