"""kubeadm init phases up to kubelet-start on an openssl CA (v1beta4 and v1beta3): manifests, kubeconfigs and
kubelet files as kubeadm writes them; preflight, wait-control-plane timeout, fault knobs, version, reset."""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_kubeadm_support import (
    DOCKER_SOCK,
    ENDPOINT_IP,
    config_v1beta3,
    config_v1beta4,
    free_port,
    openssl_pki,
    run_kubeadm,
    tree_hash,
)

from simnode.host import prepare_host

FILE_PHASES_SKIPPED = ("wait-control-plane,upload-config,upload-certs,mark-control-plane,bootstrap-token,"
                       "kubelet-finalize,addon,show-join-command")
# wait-control-plane is hidden in v1.31-v1.33 (no `init phase wait-control-plane`): it runs inside a full init.
ONLY_WAIT = ("--skip-phases=preflight,certs,kubeconfig,etcd,control-plane,kubelet-start,upload-config,upload-certs,"
             "mark-control-plane,bootstrap-token,kubelet-finalize,addon,show-join-command")


@pytest.fixture(scope="module")
def ca_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = tmp_path_factory.mktemp("ca") / "pki"
    openssl_pki(pki, ca_only=True)
    return pki


def new_node(tmp_path: Path, ca_only: Path, text: str, cert_dir: str = "etc/kubernetes/pki") -> tuple[Path, Path]:
    root = tmp_path / "root"
    shutil.copytree(ca_only, root / cert_dir)
    prepare_host(root)  # a machine kubeadm's preflight accepts (CPUs, memory, tools, ip_forward, no swap)
    cfg = tmp_path / "kubeadm.yaml"
    cfg.write_text(text)
    return root, cfg


def command_of(root: Path, component: str) -> list[str]:
    pod = yaml.safe_load((root / f"etc/kubernetes/manifests/{component}.yaml").read_text())
    command: list[str] = pod["spec"]["containers"][0]["command"]
    return command


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def fake_kubelet_healthz(port: int) -> Iterator[None]:
    """A /healthz that answers 200 on 127.0.0.1:port (the kubelet's healthz endpoint, nothing else)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Healthz)
    threading.Thread(target=server.serve_forever, daemon=True, name="fake-kubelet-healthz").start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def test_v1beta4_init_up_to_kubelet_start(tmp_path: Path, ca_only: Path) -> None:
    port, healthz = free_port(), free_port()
    root, cfg = new_node(tmp_path, ca_only, config_v1beta4(port=port, healthz_port=healthz))
    result = run_kubeadm(root, "init", f"--config={cfg}", f"--skip-phases={FILE_PHASES_SKIPPED}")
    assert result.returncode == 0, result.stderr
    for line in ("[init] Using Kubernetes version: v1.31.4", '[certs] Generating "apiserver" certificate and key',
                 '[kubeconfig] Writing "admin.conf" kubeconfig file',
                 '[control-plane] Creating static Pod manifest for "kube-apiserver"',
                 "[kubelet-start] Starting the kubelet"):
        assert line in result.stdout
    assert "wait-control-plane" not in result.stdout

    manifests = root / "etc/kubernetes/manifests"
    assert sorted(p.name for p in manifests.iterdir()) == ["etcd.yaml", "kube-apiserver.yaml",
                                                           "kube-controller-manager.yaml", "kube-scheduler.yaml"]
    pod: dict[str, Any] = yaml.safe_load((manifests / "kube-apiserver.yaml").read_text())
    api = pod["spec"]["containers"][0]
    assert api["image"] == "127.0.0.1:5000/k8s/kube-apiserver:v1.31.4"
    assert pod["spec"]["hostNetwork"] is True
    assert pod["metadata"]["labels"] == {"component": "kube-apiserver", "tier": "control-plane"}
    assert pod["metadata"]["annotations"]["kubeadm.kubernetes.io/kube-apiserver.advertise-address.endpoint"] == \
        f"127.0.0.1:{port}"
    for flag in ("--advertise-address=127.0.0.1", f"--secure-port={port}", "--bind-address=127.0.0.1",
                 "--tls-cert-file=/etc/kubernetes/pki/apiserver.crt",
                 "--tls-private-key-file=/etc/kubernetes/pki/apiserver.key",
                 "--client-ca-file=/etc/kubernetes/pki/ca.crt", "--service-cluster-ip-range=10.96.0.0/12",
                 "--etcd-servers=https://127.0.0.1:2379", "--service-account-key-file=/etc/kubernetes/pki/sa.pub",
                 "--service-account-signing-key-file=/etc/kubernetes/pki/sa.key", "--audit-log-maxage=7"):
        assert flag in api["command"], flag
    assert api["command"][1:] == sorted(api["command"][1:])  # kubeadm sorts the flags
    assert api["livenessProbe"]["httpGet"] == {"host": "127.0.0.1", "path": "/livez", "port": port,
                                               "scheme": "HTTPS"}
    cm = command_of(root, "kube-controller-manager")
    for flag in ("--kubeconfig=/etc/kubernetes/controller-manager.conf", "--cluster-cidr=10.244.0.0/16",
                 "--allocate-node-cidrs=true", "--node-monitor-period=3s",
                 "--cluster-signing-key-file=/etc/kubernetes/pki/ca.key"):
        assert flag in cm, flag
    assert "--kubeconfig=/etc/kubernetes/scheduler.conf" in command_of(root, "kube-scheduler")
    etcd = command_of(root, "etcd")
    assert "--data-dir=/var/lib/etcd" in etcd and "--name=node1" in etcd
    assert (manifests / "etcd.yaml").read_text().count("127.0.0.1:5000/k8s/etcd:3.5.15-0") == 1

    kubelet = yaml.safe_load((root / "var/lib/kubelet/config.yaml").read_text())
    assert kubelet["kind"] == "KubeletConfiguration"
    assert (kubelet["healthzPort"], kubelet["staticPodPath"], kubelet["clusterDNS"], kubelet["clusterDomain"]) == (
        healthz, "/etc/kubernetes/manifests", ["10.96.0.10"], "cluster.local")
    flags = (root / "var/lib/kubelet/kubeadm-flags.env").read_text()
    assert flags.startswith('KUBELET_KUBEADM_ARGS="') and flags.endswith('"\n')
    for flag in (f"--container-runtime-endpoint=unix://{DOCKER_SOCK}",
                 "--pod-infra-container-image=127.0.0.1:5000/k8s/pause:3.10", "--node-ip=127.0.0.1", "--v=2"):
        assert flag in flags, flag
    admin = yaml.safe_load((root / "etc/kubernetes/admin.conf").read_text())
    assert admin["clusters"][0]["cluster"]["server"] == f"https://{ENDPOINT_IP}:{port}"

    # Re-running converges: our manifests are no preflight conflict, certs and kubeconfigs are reused.
    pki = tree_hash(root / "etc/kubernetes/pki")
    again = run_kubeadm(root, "init", f"--config={cfg}", f"--skip-phases={FILE_PHASES_SKIPPED}")
    assert again.returncode == 0, again.stderr
    assert "[certs] Using existing apiserver certificate and key on disk" in again.stdout
    assert tree_hash(root / "etc/kubernetes/pki") == pki


def test_v1beta3_fields_and_custom_cert_dir(tmp_path: Path, ca_only: Path) -> None:
    healthz = free_port()
    text = config_v1beta3(port=free_port(), healthz_port=healthz, cert_dir="/etc/kubernetes/mypki")
    root, cfg = new_node(tmp_path, ca_only, text, cert_dir="etc/kubernetes/mypki")
    result = run_kubeadm(root, "init", f"--config={cfg}", f"--skip-phases=preflight,{FILE_PHASES_SKIPPED}")
    assert result.returncode == 0, result.stderr
    assert "[preflight]" not in result.stdout
    assert (root / "etc/kubernetes/mypki/apiserver.crt").is_file()
    assert not (root / "etc/kubernetes/pki").exists()
    api = command_of(root, "kube-apiserver")
    assert "--tls-cert-file=/etc/kubernetes/mypki/apiserver.crt" in api
    assert "--service-cluster-ip-range=10.112.0.0/16" in api and "--audit-log-maxage=9" in api
    assert "--service-account-issuer=https://kubernetes.default.svc.sim.local" in api
    assert "--data-dir=/var/lib/etcd-data" in command_of(root, "etcd")
    kubelet = yaml.safe_load((root / "var/lib/kubelet/config.yaml").read_text())
    assert (kubelet["clusterDNS"], kubelet["clusterDomain"]) == (["10.112.0.10"], "sim.local")
    assert kubelet["authentication"]["x509"]["clientCAFile"] == "/etc/kubernetes/mypki/ca.crt"
    assert "--max-pods=50" in (root / "var/lib/kubelet/kubeadm-flags.env").read_text()
    # v1beta3's apiServer.timeoutForControlPlane bounds the API check (no API server runs here).
    with fake_kubelet_healthz(healthz):
        result = run_kubeadm(root, "init", f"--config={cfg}", ONLY_WAIT)
    assert result.returncode == 1
    assert f"[kubelet-check] Waiting for a healthy kubelet at http://127.0.0.1:{healthz}/healthz" in result.stdout
    assert "[api-check] Waiting for a healthy API server. This can take up to 1s" in result.stdout


def test_wait_control_plane_times_out_like_kubeadm(tmp_path: Path, ca_only: Path) -> None:
    extra = "timeouts:\n  kubeletHealthCheck: 1s\n  controlPlaneComponentHealthCheck: 1s\n"
    healthz = free_port()
    root, cfg = new_node(tmp_path, ca_only, config_v1beta4(port=free_port(), healthz_port=healthz, extra_init=extra))
    assert run_kubeadm(root, "init", "phase", "kubeconfig", "admin", f"--config={cfg}").returncode == 0
    result = run_kubeadm(root, "init", f"--config={cfg}", ONLY_WAIT)
    assert result.returncode == 1
    assert "This can take up to 1s" in result.stdout
    assert "[kubelet-check] The kubelet is not healthy after" in result.stdout
    assert "error execution phase wait-control-plane: failed while waiting for the kubelet" in result.stderr
    assert "context deadline exceeded" in result.stderr
    # With a healthy kubelet /healthz but no API server, it is the API check that runs out.
    with fake_kubelet_healthz(healthz):
        result = run_kubeadm(root, "init", f"--config={cfg}", ONLY_WAIT)
    assert result.returncode == 1
    assert "[kubelet-check] The kubelet is healthy after" in result.stdout
    assert "[api-check] The API server is not healthy after" in result.stdout
    assert "the API server at https://" in result.stderr and "context deadline exceeded" in result.stderr


def test_preflight_errors_and_ignores(tmp_path: Path, ca_only: Path) -> None:
    port = free_port()
    root, cfg = new_node(tmp_path, ca_only, config_v1beta4(port=port, healthz_port=free_port(),
                                                            cri_socket="unix:///run/nowhere/cri.sock"))
    manifests = root / "etc/kubernetes/manifests"
    manifests.mkdir(parents=True)
    (manifests / "kube-apiserver.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: someone-elses}\n")
    (manifests / "extra.yaml").write_text("x: 1\n")
    before = tree_hash(root)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = run_kubeadm(root, "init", f"--config={cfg}")
        assert result.returncode == 1
        for error in (f"[ERROR Port-{port}]: Port {port} is in use",
                      "[ERROR FileAvailable--etc-kubernetes-manifests-kube-apiserver.yaml]: "
                      "/etc/kubernetes/manifests/kube-apiserver.yaml already exists",
                      "[ERROR DirAvailable--etc-kubernetes-manifests]: /etc/kubernetes/manifests is not empty",
                      '[ERROR CRI]: container runtime is not running: validate CRI v1 runtime API for endpoint '
                      '"unix:///run/nowhere/cri.sock"'):
            assert error in result.stderr, error
        assert "error execution phase preflight" in result.stderr
        assert tree_hash(root) == before
        ignored = ",".join((f"Port-{port}", "CRI", "FileAvailable--etc-kubernetes-manifests-kube-apiserver.yaml",
                            "DirAvailable--etc-kubernetes-manifests"))
        result = run_kubeadm(root, "init", "phase", "preflight", f"--config={cfg}",
                             f"--ignore-preflight-errors={ignored}")
        assert result.returncode == 0, result.stderr
        assert f"[WARNING Port-{port}]: Port {port} is in use" in result.stdout
    (manifests / "extra.yaml").unlink()
    (manifests / "kube-apiserver.yaml").unlink()
    (root / "run/nowhere").mkdir(parents=True)
    (root / "run/nowhere/cri.sock").touch()  # the socket under the node root counts
    result = run_kubeadm(root, "init", "phase", "preflight", f"--config={cfg}")
    assert result.returncode == 0, result.stderr


def break_machine(root: Path) -> None:
    """The knobs of the machine view: swap on, ip_forward 0, no conntrack, 1 CPU, 1 GiB, old etcd data."""
    (root / "proc/swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n/swapfile  file  1048572  0  -2\n")
    (root / "proc/sys/net/ipv4/ip_forward").write_text("0\n")
    (root / "usr/sbin/conntrack").unlink()
    (root / "sys/devices/system/cpu/online").write_text("0\n")
    (root / "proc/meminfo").write_text("MemTotal:        1048576 kB\n")
    (root / "var/lib/etcd/member").mkdir(parents=True)


def test_preflight_reports_every_unmet_machine_prerequisite_at_once(tmp_path: Path, ca_only: Path) -> None:
    port = free_port()
    root, cfg = new_node(tmp_path, ca_only, config_v1beta4(port=port, healthz_port=free_port()))
    break_machine(root)
    before = tree_hash(root)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = run_kubeadm(root, "init", f"--config={cfg}")
    assert result.returncode == 1
    assert "error execution phase preflight: [preflight] Some fatal errors occurred:" in result.stderr
    for error in ("[ERROR NumCPU]: the number of available CPUs 1 is less than the required 2",
                  "[ERROR Mem]: the system RAM (1024 MB) is less than the minimum 1700 MB",
                  f"[ERROR Port-{port}]: Port {port} is in use",
                  "[ERROR FileExisting-conntrack]: conntrack not found in system path",
                  "[ERROR FileContent--proc-sys-net-ipv4-ip_forward]: /proc/sys/net/ipv4/ip_forward contents are "
                  "not set to 1",
                  "[ERROR DirAvailable--var-lib-etcd]: /var/lib/etcd is not empty"):
        assert error in result.stderr, (error, result.stderr)
    # v1.31's SwapCheck only warns (the kubelet is what refuses swap); ebtables is optional.
    assert "[WARNING Swap]: swap is supported for cgroup v2 only." in result.stdout
    assert "[WARNING FileExisting-ebtables]: ebtables not found in system path" in result.stdout
    assert tree_hash(root) == before  # nothing written
    ignored = "NumCPU,Mem,FileExisting-conntrack,FileContent--proc-sys-net-ipv4-ip_forward,DirAvailable--var-lib-etcd"
    result = run_kubeadm(root, "init", "phase", "preflight", f"--config={cfg}", f"--ignore-preflight-errors={ignored}")
    assert result.returncode == 0, result.stderr
    assert "[WARNING FileExisting-conntrack]: conntrack not found in system path" in result.stdout


def test_conntrack_is_required_below_v1_32_only(tmp_path: Path, ca_only: Path) -> None:
    text = config_v1beta4(port=free_port(), healthz_port=free_port())
    root, cfg = new_node(tmp_path, ca_only, text)
    (root / "usr/sbin/conntrack").unlink()
    result = run_kubeadm(root, "init", "phase", "preflight", f"--config={cfg}")
    assert result.returncode == 1 and "[ERROR FileExisting-conntrack]" in result.stderr
    cfg.write_text(text.replace("kubernetesVersion: v1.31.4", "kubernetesVersion: v1.32.1"))
    v132 = {"SIMNODE_VERSION": "v1.32.1"}
    result = run_kubeadm(root, "init", "phase", "preflight", f"--config={cfg}", env=v132)
    assert result.returncode == 0, result.stderr
    (root / "usr/sbin/ip").unlink()  # mandatory in every version
    result = run_kubeadm(root, "init", "phase", "preflight", f"--config={cfg}", env=v132)
    assert result.returncode == 1 and "[ERROR FileExisting-ip]: ip not found in system path" in result.stderr


def test_fault_knob_fails_the_chosen_phase_before_it_writes(tmp_path: Path, ca_only: Path) -> None:
    root, cfg = new_node(tmp_path, ca_only, config_v1beta4(port=free_port(), healthz_port=free_port()))
    faults = root / "etc/simnode/faults.json"
    faults.parent.mkdir(parents=True)
    faults.write_text(json.dumps({"kubeadm_fail": {"phase": "control-plane", "message": "simulated disk full",
                                                   "exit_code": 3}}))
    result = run_kubeadm(root, "init", f"--config={cfg}", f"--skip-phases={FILE_PHASES_SKIPPED}")
    assert result.returncode == 3
    assert "error execution phase control-plane: simulated disk full" in result.stderr
    assert [p.name for p in (root / "etc/kubernetes/manifests").iterdir()] == ["etcd.yaml"]  # etcd ran, c-p did not
    assert "[control-plane]" not in result.stdout
    faults.write_text(json.dumps({"delays_s": {"kubeadm_phase": 0.2}}))
    result = run_kubeadm(root, "init", "phase", "control-plane", "all", f"--config={cfg}")
    assert result.returncode == 0, result.stderr
    faults.write_text("{not json")
    result = run_kubeadm(root, "init", "phase", "control-plane", "all", f"--config={cfg}")
    assert result.returncode == 1
    assert "faults file" in result.stderr


def test_unknown_phase_prints_help_and_sub_phase_fails(tmp_path: Path) -> None:
    # cobra: `phase` has no Run, so an unknown name under it prints its help and exits 0 (doing nothing) ...
    result = run_kubeadm(tmp_path, "init", "phase", "frobnicate")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('Use this command to invoke single phase of the "init" workflow')
    # ... while a flag that only the phases define is unknown to `phase` itself.
    result = run_kubeadm(tmp_path, "init", "phase", "frobnicate", "--config=/nowhere.yaml")
    assert result.returncode == 1
    assert result.stderr.startswith("unknown flag: --config\n")
    result = run_kubeadm(tmp_path, "init", "phase", "addon", "weave")
    assert result.returncode == 1
    assert 'unknown command "weave" for "kubeadm init phase addon"' in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("version", ["v1.31.4", "v1.32.1"])
def test_wait_control_plane_is_no_phase_subcommand_before_1_34(tmp_path: Path, ca_only: Path, version: str) -> None:
    """Issue 7 finding 1: the hidden phase is refused as `kubeadm init phase` refuses it; a full init runs it."""
    env = {"SIMNODE_VERSION": version}
    healthz = free_port()
    extra = "timeouts:\n  kubeletHealthCheck: 1s\n  controlPlaneComponentHealthCheck: 1s\n"
    text = config_v1beta4(port=free_port(), healthz_port=healthz, extra_init=extra)
    root, cfg = new_node(tmp_path, ca_only, text.replace("kubernetesVersion: v1.31.4", f"kubernetesVersion: {version}"))
    before = tree_hash(root)
    result = run_kubeadm(root, "init", "phase", "wait-control-plane", f"--config={cfg}", env=env)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("unknown flag: --config\n"
                             "To see the stack trace of this error execute with --v=5 or higher\n")
    # Without flags cobra shows the `phase` help (where wait-control-plane is not listed) and exits 0, waiting
    # for nothing: a caller that drops --config is not told either.
    result = run_kubeadm(root, "init", "phase", "wait-control-plane", env=env)
    assert result.returncode == 0, result.stderr
    assert "Available Commands:" in result.stdout and "upload-config" in result.stdout
    assert "wait-control-plane" not in result.stdout and "[wait-control-plane]" not in result.stdout
    assert tree_hash(root) == before
    # In a full init (with kubeconfigs in place) it is the phase that waits for the kubelet.
    assert run_kubeadm(root, "init", "phase", "kubeconfig", "admin", f"--config={cfg}", env=env).returncode == 0
    with fake_kubelet_healthz(healthz):
        result = run_kubeadm(root, "init", f"--config={cfg}", ONLY_WAIT, env=env)
    assert "[wait-control-plane] Waiting for the kubelet to boot up the control plane" in result.stdout
    assert "[kubelet-check] The kubelet is healthy after" in result.stdout


def test_wait_control_plane_is_a_phase_from_1_34_but_takes_no_config(tmp_path: Path) -> None:
    result = run_kubeadm(tmp_path, "init", "phase", "wait-control-plane", "--config=/k.yaml",
                         env={"SIMNODE_VERSION": "v1.34.0"})
    assert (result.returncode, result.stderr.splitlines()[0]) == (1, "unknown flag: --config")
    result = run_kubeadm(tmp_path, "init", "phase", "--help", env={"SIMNODE_VERSION": "v1.34.0"})
    assert result.returncode == 0
    result = run_kubeadm(tmp_path, "init", "phase", "nonesuch", env={"SIMNODE_VERSION": "v1.34.0"})
    assert "  wait-control-plane " in result.stdout  # listed among the phases from v1.34


def test_version_outputs(tmp_path: Path) -> None:
    result = run_kubeadm(tmp_path, "version", "-o", "short")
    assert (result.returncode, result.stdout) == (0, "v1.31.4\n")
    result = run_kubeadm(tmp_path, "version", "-o=json", env={"SIMNODE_VERSION": "v1.32.1"})
    assert json.loads(result.stdout)["clientVersion"]["gitVersion"] == "v1.32.1"
    result = run_kubeadm(tmp_path, "version", "--output", "yaml")
    assert yaml.safe_load(result.stdout)["clientVersion"]["minor"] == "31"
    result = run_kubeadm(tmp_path, "version", "-o", "xml")
    assert result.returncode == 1 and "invalid output format" in result.stderr


def test_reset_asks_then_clears_what_init_wrote(tmp_path: Path, ca_only: Path) -> None:
    root, cfg = new_node(tmp_path, ca_only, config_v1beta4(port=free_port(), healthz_port=free_port()))
    machine = {p for p in root.rglob("*") if p.is_file() and not p.is_relative_to(root / "etc/kubernetes")}
    assert run_kubeadm(root, "init", f"--config={cfg}", f"--skip-phases={FILE_PHASES_SKIPPED}").returncode == 0
    (root / "var/lib/etcd/member").mkdir(parents=True)
    (root / "var/lib/etcd/member/db").write_text("data")
    keep = root / "etc/kubernetes/keep-me.txt"
    keep.write_text("not kubeadm's")
    before = tree_hash(root)
    cri = "--cri-socket=unix:///var/run/cri-dockerd.sock"  # the machine has containerd's socket too (host.py)
    result = run_kubeadm(root, "reset", cri, stdin="n\n")
    assert result.returncode == 1
    assert "[reset] Are you sure you want to proceed? [y/N]:" in result.stdout
    assert "aborted reset operation" in result.stderr
    assert tree_hash(root) == before
    result = run_kubeadm(root, "reset", "-f", cri)
    assert result.returncode == 0, result.stderr
    assert "[reset] Deleting contents of directories: [/var/lib/kubelet /etc/kubernetes/pki]" in result.stdout
    assert "[reset] Deleted contents of the etcd data directory: /var/lib/etcd" in result.stdout
    leftovers = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p not in machine)
    assert leftovers == ["etc/kubernetes/keep-me.txt"]
    assert run_kubeadm(root, "reset", "--cert-dir=/etc", "-f", cri).returncode == 1  # refuses a top-level dir
    assert keep.is_file()


def test_rootfs_flag_wins_over_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "kubeadm.yaml"
    cfg.write_text(config_v1beta4(port=free_port(), healthz_port=free_port()))
    env_root, flag_root = tmp_path / "env-root", tmp_path / "flag-root"
    result = run_kubeadm(env_root, "init", "phase", "etcd", "local", f"--config={cfg}", "--rootfs", str(flag_root))
    assert result.returncode == 0, result.stderr
    assert (flag_root / "etc/kubernetes/manifests/etcd.yaml").is_file()
    assert not env_root.exists()


def test_reset_on_a_host_with_two_runtimes_needs_the_cri_socket(tmp_path: Path, ca_only: Path) -> None:
    """Issue 7 finding 3: Docker Engine's containerd.sock next to cri-dockerd.sock makes kubeadm's CRI detection
    fail, before anything is removed, unless --cri-socket or a ResetConfiguration names the endpoint."""
    from simnode.host import prepare_host

    root, cfg = new_node(tmp_path, ca_only, config_v1beta4(port=free_port(), healthz_port=free_port()))
    assert run_kubeadm(root, "init", f"--config={cfg}", f"--skip-phases={FILE_PHASES_SKIPPED}").returncode == 0
    prepare_host(root)  # the machine: both sockets, as on a Debian VM with Docker Engine and cri-dockerd
    before = tree_hash(root)
    result = run_kubeadm(root, "reset", "-f")
    assert result.returncode == 1
    assert result.stderr == (
        "found multiple CRI endpoints on the host. Please define which one do you wish to use by setting the "
        "'criSocket' field in the kubeadm configuration file: unix:///var/run/containerd/containerd.sock, "
        "unix:///var/run/cri-dockerd.sock\nTo see the stack trace of this error execute with --v=5 or higher\n")
    assert result.stdout == "" and tree_hash(root) == before
    # A plain file where a socket should be is no runtime (kubeadm dials the endpoint; a file never answers).
    (root / "var/run/containerd/containerd.sock").unlink()
    (root / "var/run/containerd/containerd.sock").write_text("")
    assert run_kubeadm(root, "reset", "--cert-dir=/etc", "-f").stderr.startswith("--cert-dir '/etc'")
    (root / "var/run/containerd/containerd.sock").unlink()
    prepare_host(root)
    reset_cfg = tmp_path / "reset.yaml"
    reset_cfg.write_text("apiVersion: kubeadm.k8s.io/v1beta4\nkind: ResetConfiguration\n"
                         "criSocket: unix:///var/run/cri-dockerd.sock\nforce: true\n")
    result = run_kubeadm(root, "reset", "-f", f"--config={reset_cfg}")
    assert result.returncode == 0, result.stderr
    assert "[reset] Deleting contents of directories" in result.stdout
    assert run_kubeadm(root, "init", f"--config={cfg}", f"--skip-phases={FILE_PHASES_SKIPPED}").returncode == 0
    result = run_kubeadm(root, "reset", "-f", "--cri-socket=unix:///var/run/cri-dockerd.sock")
    assert result.returncode == 0, result.stderr
    assert not (root / "etc/kubernetes/manifests/etcd.yaml").exists()


def test_init_config_without_cri_socket_detects_it_like_kubeadm(tmp_path: Path, ca_only: Path) -> None:
    from simnode.host import prepare_host

    text = config_v1beta4(port=free_port(), healthz_port=free_port(), cri_socket="REMOVED")
    root, cfg = new_node(tmp_path, ca_only, text.replace("  criSocket: REMOVED\n", ""))
    prepare_host(root)
    before = tree_hash(root)
    result = run_kubeadm(root, "init", "phase", "kubelet-start", f"--config={cfg}")
    assert result.returncode == 1
    assert result.stderr.startswith("found multiple CRI endpoints on the host. Please define which one")
    assert tree_hash(root) == before
    (root / "var/run/containerd/containerd.sock").unlink()  # only cri-dockerd left: that one is used
    result = run_kubeadm(root, "init", "phase", "kubelet-start", f"--config={cfg}")
    assert result.returncode == 0, result.stderr
    flags = (root / "var/lib/kubelet/kubeadm-flags.env").read_text()
    assert "--container-runtime-endpoint=unix:///var/run/cri-dockerd.sock" in flags
