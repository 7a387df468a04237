"""kubeadm config parsing and validation through the real CLI: each bad input exits 1 naming the cause and
leaves the node root untouched; unknown fields only warn; v1beta3 and v1beta4 fields are honoured."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_kubeadm_support import config_v1beta3, config_v1beta4, free_port, run_kubeadm, tree_hash

from simnode.kubeadm.addons import coredns_deployment, coredns_service
from simnode.kubeadm.config import Config, kubeadm_images
from simnode.kubeadm.configload import load_config
from simnode.kubeadm.errors import ConfigError, KubeadmError
from simnode.kubeadm.upgrade import check_target
from simnode.kubeadm.values import format_duration, parse_duration_s


def _good(port: int = 16443) -> str:
    return config_v1beta4(port=port, healthz_port=20248)


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


BAD_CONFIGS: list[tuple[str, str, str, str]] = [
    # (id, old, new, expected message on stderr)
    ("unknown-kind", "kind: ClusterConfiguration", "kind: Foo",
     'no kind "Foo" is registered for version "kubeadm.k8s.io/v1beta4" in scheme'),
    ("unknown-version", "apiVersion: kubeadm.k8s.io/v1beta4\nkind: InitConfiguration",
     "apiVersion: kubeadm.k8s.io/v1beta9\nkind: InitConfiguration",
     'no kind "InitConfiguration" is registered for version "kubeadm.k8s.io/v1beta9"'),
    ("old-version", "apiVersion: kubeadm.k8s.io/v1beta4\nkind: InitConfiguration",
     "apiVersion: kubeadm.k8s.io/v1beta2\nkind: InitConfiguration", 'uses an old API spec: "kubeadm.k8s.io/v1beta2"'),
    ("unknown-group", "apiVersion: kubelet.config.k8s.io/v1beta1", "apiVersion: kubelet.config.k8s.io/v9",
     'no kind "KubeletConfiguration" is registered for version "kubelet.config.k8s.io/v9"'),
    ("missing-kind", "kind: ClusterConfiguration\n", "", "Object 'Kind' is missing"),
    ("malformed-yaml", "  advertiseAddress: 127.0.0.1", "  advertiseAddress: [127.0.0.1",
     "error converting YAML to JSON: yaml: line"),
    ("wrong-type", "  bindPort: 16443", '  bindPort: "x"',
     "cannot unmarshal string into Go struct field InitConfiguration.localAPIEndpoint.bindPort of type int32"),
    ("wrong-type-list", "  podSubnet: 10.244.0.0/16", "  podSubnet: [a]",
     "cannot unmarshal array into Go struct field ClusterConfiguration.networking.podSubnet of type string"),
    ("bad-ip", "advertiseAddress: 127.0.0.1", "advertiseAddress: 10.0.0.300",
     'localAPIEndpoint.advertiseAddress: Invalid value: "10.0.0.300"'),
    ("missing-ip", "  advertiseAddress: 127.0.0.1\n", "", "localAPIEndpoint.advertiseAddress: Required value"),
    ("bad-port", "  bindPort: 16443", "  bindPort: 70000", "localAPIEndpoint.bindPort: Invalid value: 70000"),
    ("bad-cidr", "  podSubnet: 10.244.0.0/16", "  serviceSubnet: 10.96.0.0/40",
     'networking.serviceSubnet: Invalid value: "10.96.0.0/40"'),
    ("overlap", "  podSubnet: 10.244.0.0/16", "  podSubnet: 10.96.0.0/16",
     'networking.podSubnet: Invalid value: "10.96.0.0/16": must not overlap with serviceSubnet "10.96.0.0/12"'),
    ("version-form", "kubernetesVersion: v1.31.4", "kubernetesVersion: stable-1",
     'kubernetesVersion: Invalid value: "stable-1": must be a version of the form "vX.Y.Z"'),
    ("version-unknown", "kubernetesVersion: v1.31.4", "kubernetesVersion: v1.32.1",
     'kubernetesVersion: Invalid value: "v1.32.1": this kubeadm can only install v1.31.4'),
    ("encryption", "encryptionAlgorithm: ECDSA-P256", "encryptionAlgorithm: RSA-1024",
     'encryptionAlgorithm: Unsupported value: "RSA-1024"'),
    ("cri-socket", "criSocket: unix:///", "criSocket: /", 'nodeRegistration.criSocket: Invalid value: "/'),
    ("node-name", "name: node1", "name: Node_1", 'nodeRegistration.name: Invalid value: "Node_1"'),
    ("endpoint", 'controlPlaneEndpoint: "10.0.0.5:', 'controlPlaneEndpoint: "bad_host:',
     'controlPlaneEndpoint: Invalid value: "bad_host:'),
    ("duration", "kind: InitConfiguration\n", "kind: InitConfiguration\ntimeouts:\n  kubeletHealthCheck: 5 minutes\n",
     'timeouts.kubeletHealthCheck: Invalid value: "5 minutes"'),
    ("taint-effect", "  criSocket:", "  taints:\n  - key: a\n    effect: Sometimes\n  criSocket:",
     'nodeRegistration.taints[0].effect: Unsupported value: "Sometimes"'),
    ("healthz-port", "healthzPort: 20248", "healthzPort: 0", "KubeletConfiguration.healthzPort: Invalid value: 0"),
    ("token", "kind: InitConfiguration\n", "kind: InitConfiguration\nbootstrapTokens:\n- token: short\n",
     'bootstrapTokens[0].token: Invalid value: "short"'),
]


CLI_CASES = ("unknown-kind", "unknown-version", "malformed-yaml", "wrong-type", "bad-ip", "overlap", "version-unknown")


@pytest.mark.parametrize(("old", "new", "expected"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_rejected_naming_the_cause(tmp_path: Path, old: str, new: str, expected: str) -> None:
    cfg = tmp_path / "kubeadm.yaml"
    cfg.write_text(_replace(_good(), old, new))
    with pytest.raises(ConfigError) as info:
        load_config(cfg, allowed_versions=("v1.31.4",), default_version="v1.31.4")
    assert expected in str(info.value)


@pytest.mark.parametrize(("old", "new", "expected"), [c[1:] for c in BAD_CONFIGS if c[0] in CLI_CASES],
                         ids=[c[0] for c in BAD_CONFIGS if c[0] in CLI_CASES])
def test_bad_config_exits_1_naming_the_cause_and_writes_nothing(tmp_path: Path, old: str, new: str,
                                                                 expected: str) -> None:
    root = tmp_path / "root"
    (root / "etc/kubernetes/manifests").mkdir(parents=True)
    cfg = tmp_path / "kubeadm.yaml"
    cfg.write_text(_replace(_good(), old, new))
    before = tree_hash(root)
    result = run_kubeadm(root, "init", f"--config={cfg}", "--ignore-preflight-errors=all")
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stderr
    assert tree_hash(root) == before
    assert sorted(p.name for p in root.rglob("*")) == ["etc", "kubernetes", "manifests"]


def test_unknown_field_only_warns_like_kubeadm_strict_decoding(tmp_path: Path) -> None:
    cfg = tmp_path / "kubeadm.yaml"
    cfg.write_text(_replace(_good(), "  podSubnet: 10.244.0.0/16", "  podSubnet: 10.244.0.0/16\n  fooBar: 1"))
    result = run_kubeadm(tmp_path / "root", "init", "phase", "control-plane", "scheduler", f"--config={cfg}")
    assert result.returncode == 0, result.stderr
    assert 'strict decoding error: unknown field "networking.fooBar"' in result.stderr
    assert (tmp_path / "root/etc/kubernetes/manifests/kube-scheduler.yaml").is_file()


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    result = run_kubeadm(tmp_path, "init", "phase", "etcd", "local", f"--config={tmp_path}/nope.yaml")
    assert result.returncode == 1
    assert f'unable to read config from "{tmp_path}/nope.yaml"' in result.stderr


def test_defaults_fill_in_a_minimal_config(tmp_path: Path) -> None:
    cfg = tmp_path / "kubeadm.yaml"
    cfg.write_text("apiVersion: kubeadm.k8s.io/v1beta4\nkind: InitConfiguration\n"
                   "localAPIEndpoint: {advertiseAddress: 127.0.0.1}\nnodeRegistration: {name: node1}\n")
    root = tmp_path / "root"
    result = run_kubeadm(root, "init", "phase", "control-plane", "apiserver", f"--config={cfg}")
    assert result.returncode == 0, result.stderr
    pod = yaml.safe_load((root / "etc/kubernetes/manifests/kube-apiserver.yaml").read_text())
    command = pod["spec"]["containers"][0]["command"]
    assert "--secure-port=6443" in command
    assert "--service-cluster-ip-range=10.96.0.0/12" in command
    assert "--client-ca-file=/etc/kubernetes/pki/ca.crt" in command
    assert pod["spec"]["containers"][0]["image"] == "registry.k8s.io/kube-apiserver:v1.31.4"
    run_kubeadm(root, "init", "phase", "kubelet-start", f"--config={cfg}")
    kubelet = yaml.safe_load((root / "var/lib/kubelet/config.yaml").read_text())
    assert (kubelet["healthzPort"], kubelet["clusterDNS"], kubelet["clusterDomain"]) == (10248, ["10.96.0.10"],
                                                                                        "cluster.local")


def test_go_durations_round_trip() -> None:
    assert parse_duration_s("4m0s") == 240
    assert parse_duration_s("1h30m") == 5400
    assert parse_duration_s("1.5s") == 1.5
    assert format_duration(240) == "4m0s"
    assert format_duration(8760 * 3600) == "8760h0m0s"
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration_s("5 minutes")


def test_port_flag_and_config_error_exit_codes(tmp_path: Path) -> None:
    result = run_kubeadm(tmp_path, "init", "--bogus-flag")
    assert result.returncode == 1
    assert "unknown flag: --bogus-flag" in result.stderr
    port = free_port()
    cfg = tmp_path / "kubeadm.yaml"
    cfg.write_text(_good(port))
    result = run_kubeadm(tmp_path / "root", "init", f"--config={cfg}", "--skip-phases=nope")
    assert result.returncode == 1
    assert 'skip-phases: unknown phase "nope"' in result.stderr


def _load_text(tmp_path: Path, text: str) -> Config:
    cfg = tmp_path / "kubeadm.yaml"
    cfg.write_text(text)
    return load_config(cfg, allowed_versions=("v1.31.4",), default_version="v1.31.4")


def test_taints_default_to_control_plane_and_empty_means_none(tmp_path: Path) -> None:
    default = _load_text(tmp_path, _good())
    assert [(t.key, t.effect) for t in default.init.taints] == [("node-role.kubernetes.io/control-plane",
                                                                  "NoSchedule")]
    none = _load_text(tmp_path, _replace(_good(), "  criSocket:", "  taints: []\n  criSocket:"))
    assert none.init.taints == []


def test_v1beta3_shapes_are_read(tmp_path: Path) -> None:
    cfg = _load_text(tmp_path, config_v1beta3(port=16443, healthz_port=20248))
    assert cfg.init.kubelet_extra_args == [("max-pods", "50")]
    assert cfg.cluster.apiserver_extra_args == [("audit-log-maxage", "9")]
    assert cfg.init.control_plane_timeout_s == 1.0
    assert cfg.cluster.encryption_algorithm == "RSA-2048"
    assert str(cfg.dns_service_ip) == "10.112.0.10"


def test_upgrade_version_skew_rules() -> None:
    assert check_target("v1.32.1", "v1.32.1", "v1.31.4") == "v1.32.1"
    assert check_target("v1.31.4", "v1.31.4", "v1.31.4") == "v1.31.4"  # same version: kubeadm re-applies
    # policy.go: a kubeadm of a newer minor than the target is skippable: refused without --force
    with pytest.raises(KubeadmError, match=r"can only be used to upgrade to Kubernetes version 1\.32"):
        check_target("1.31.4", "v1.32.1", "v1.31.4")
    assert check_target("1.31.4", "v1.32.1", "v1.31.4", force=True) == "v1.31.4"
    with pytest.raises(KubeadmError, match="at least one minor release higher than the kubeadm minor release"):
        check_target("v1.32.1", "v1.31.4", "v1.31.4")
    with pytest.raises(KubeadmError, match="downgrades are not supported"):
        check_target("v1.31.4", "v1.32.1", "v1.32.1", force=True)  # a downgrade: never, even forced
    with pytest.raises(KubeadmError, match="kubelets in this cluster that are too old"):
        check_target("v1.32.1", "v1.32.1", "v1.31.4", kubelet_versions=("v1.30.2",))
    with pytest.raises(KubeadmError, match="not a version the simulated node offers"):
        check_target("v1.33.0", "v1.33.0", "v1.32.1")
    with pytest.raises(KubeadmError, match=r"is not of the form vX\.Y\.Z"):
        check_target("latest", "v1.32.1", "v1.31.4")


def test_coredns_image_naming_follows_kubeadm(tmp_path: Path) -> None:
    assert kubeadm_images("registry.k8s.io", "v1.31.4")["coredns"] == "registry.k8s.io/coredns/coredns:v1.11.3"
    assert kubeadm_images("127.0.0.1:5000/k8s", "v1.32.1")["coredns"] == "127.0.0.1:5000/k8s/coredns:v1.11.3"
    cfg = _load_text(tmp_path, _replace(_good(), "imageRepository: 127.0.0.1:5000/k8s\n", ""))
    deployment = coredns_deployment(cfg)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.k8s.io/coredns/coredns:v1.11.3"
    assert coredns_service(cfg)["spec"]["clusterIP"] == "10.96.0.10"


def test_static_pod_path_other_than_kubeadms_only_warns(tmp_path: Path) -> None:
    cfg = _load_text(tmp_path, _good() + "staticPodPath: /etc/kubelet.d\n")
    assert cfg.static_pod_path == "/etc/kubelet.d"
    assert any('"staticPodPath"' in w and "/etc/kubelet.d" in w for w in cfg.warnings)
