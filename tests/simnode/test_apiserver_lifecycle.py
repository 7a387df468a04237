"""The kube-apiserver stand-in as a process: persistence across restarts, 410 for too-old watches, serving
certificate reload, readiness driven by the fault knobs, SIGTERM exit, and rejected command lines."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from test_apiserver_support import FAST_FAULTS, REPO, install_serving_pair, launch, make_pki, wait_for

CM_PATH = "/api/v1/namespaces/default/configmaps"


def served_serial(port: int, cafile: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_restart_keeps_objects_and_versions(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    root = tmp_path / "node"
    server = launch(root, pki, faults=FAST_FAULTS)
    code, body = server.request(CM_PATH, method="POST", body={"metadata": {"name": "kept"}, "data": {"k": "v"}})
    assert code == 201, body
    before = json.loads(body)
    for i in range(3):  # move the resourceVersion along
        server.request(CM_PATH, method="POST", body={"metadata": {"name": f"n{i}"}})
    _, listing = server.request(CM_PATH)
    rv_before = int(json.loads(listing)["metadata"]["resourceVersion"])
    assert server.stop() == 0, server.log.read_text()
    assert "store flushed" in server.log.read_text()
    snapshot = root / "var/lib/etcd/simnode-store/snapshot.json"
    assert json.loads(snapshot.read_text())["resourceVersion"] == rv_before

    server = launch(root, pki, port=server.port, faults=FAST_FAULTS)
    try:
        code, body = server.request(CM_PATH + "/kept")
        after = json.loads(body)
        assert code == 200 and after["data"] == {"k": "v"}
        assert after["metadata"]["uid"] == before["metadata"]["uid"]
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
        code, body = server.request(CM_PATH, method="POST", body={"metadata": {"name": "new"}})
        assert int(json.loads(body)["metadata"]["resourceVersion"]) > rv_before
        # The event history did not survive the restart: a watch from before it must re-list.
        code, body = server.request(f"{CM_PATH}?watch=1&resourceVersion={rv_before - 2}&timeoutSeconds=1")
        event = json.loads(body.splitlines()[0])
        assert event["type"] == "ERROR" and event["object"]["code"] == 410
        assert event["object"]["reason"] == "Expired"
        # ...while a watch from the current version streams what happens next, then ends on timeout.
        code, body = server.request(f"{CM_PATH}?watch=1&resourceVersion={rv_before}&timeoutSeconds=1")
        lines = [json.loads(line) for line in body.splitlines()]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [("ADDED", "new")]
    finally:
        assert server.stop() == 0


def test_serving_certificate_reload(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    root = tmp_path / "node"
    server = launch(root, pki, faults=FAST_FAULTS)
    try:
        first = x509.load_pem_x509_certificate(pki.path("apiserver.crt").read_bytes()).serial_number
        assert served_serial(server.port, pki.path("ca.crt")) == first
        pki.issue("renewed", "/CN=kube-apiserver", ext="subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
        install_serving_pair(pki, root, name="renewed")
        renewed = x509.load_pem_x509_certificate(pki.path("renewed.crt").read_bytes()).serial_number
        deadline = time.monotonic() + 5
        while served_serial(server.port, pki.path("ca.crt")) != renewed:
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            time.sleep(0.2)
        assert server.request("/api/v1/namespaces")[0] == 200
        # A broken pair is not taken: the server keeps serving the last good one.
        (root / "etc/kubernetes/pki/apiserver.key").write_text("garbage\n")
        time.sleep(1.2)
        assert served_serial(server.port, pki.path("ca.crt")) == renewed
        assert "certificate reload failed" in server.log.read_text()
    finally:
        assert server.stop() == 0


def test_readiness_follows_fault_knobs(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    root = tmp_path / "node"
    started = time.monotonic()
    server = launch(root, pki, faults={"delays_s": {"apiserver_start": 1.0, "apiserver_ready": 1.5}})
    try:
        assert time.monotonic() - started >= 1.0  # not listening before delays_s.apiserver_start
        code, body = server.request("/readyz")
        assert code == 500 and b"[-]" in body and body.strip().endswith(b"readyz check failed")
        assert server.request("/livez") == (200, b"ok")
        wait_for(server, "/readyz", 200, timeout_s=5)
        faults = root / "etc/simnode/faults.json"
        faults.write_text(json.dumps({"apiserver_never_ready": True}))
        code, body = server.request("/readyz?verbose")
        assert code == 500 and b"[-]etcd-readiness failed" in body
        faults.write_text("{not json")
        code, body = server.request("/readyz")
        assert code == 500 and b"fault knobs unreadable" in body
        faults.unlink()
        assert server.request("/readyz") == (200, b"ok")
    finally:
        assert server.stop() == 0


def test_rejected_command_lines(tmp_path: Path) -> None:
    env = {"SIMNODE_ROOT": str(tmp_path), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "simnode", "kube-apiserver", *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=30)

    res = run("--secure-port=1", "stray")
    assert res.returncode == 2 and "unexpected argument 'stray'" in res.stderr
    res = run("--secure-port=notanumber", "--tls-cert-file=/a", "--tls-private-key-file=/b")
    assert res.returncode == 2 and "--secure-port" in res.stderr
    res = run("--secure-port=0", "--tls-private-key-file=/b")
    assert res.returncode == 2 and "--tls-cert-file is required" in res.stderr
    res = run("--secure-port=0", "--tls-cert-file=/etc/kubernetes/pki/missing.crt", "--tls-private-key-file=/k")
    assert res.returncode == 1 and f"{tmp_path}/etc/kubernetes/pki/missing.crt" in res.stderr
    assert not (tmp_path / "var/lib/etcd/simnode-store").exists()  # a refused start writes nothing
