"""Certificates that never silently expire, on the simulated node through the real service, over MQTT: with
leaves of a few minutes, expiry events fire and the automatic renewal happens while `kubectl get pods -A` keeps
working but for the API server's own restart (that gap is measured and printed); a `renew-certs` request does the
same on demand. After either, `openssl s_client` sees a new serving certificate (new serial, later notAfter)
verified by the same CA, and the pods made before are still there. The kubelet's pem stays the symlink its
certificate store rotates, and the kubelet's own rotation works after a renewal.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import test_install_over_mqtt as install_e2e
import yaml
from test_install_over_mqtt import LIFECYCLE, SIM_CONFIG, Node, _wait_state, payload

make_node = install_e2e.make_node  # the fixture: a service of its own on a fresh root, killed in teardown

DAY_S = 86400.0
LEAF_S = 150.0  # leaf lifetime in the short-lived config
RENEW_BEFORE_S = 110.0  # automatic renewal ~40 s after the certificates were issued (the install is over by then)
WARN_S = (140.0, 132.0)  # expiry warnings ~10 s and ~18 s after they were issued
KUBELET_PEM = "var/lib/kubelet/pki/kubelet-client-current.pem"
RESTARTED = ("kubelet", "etcd", "kube-controller-manager", "kube-scheduler", "kube-apiserver")
API_GAP_BOUND_S = 30.0  # a correctness guard (the API came back), not a timing target


def _short_lived_config() -> str:
    text = SIM_CONFIG.read_text()
    anchor = '[pki]\nkey_algorithm = "ecdsa-p256"'
    assert anchor in text
    lines = [
        f"cert_validity_days = {LEAF_S / DAY_S:.12f}",
        "ca_validity_days = 1",
        f"expiry_warning_days = [{WARN_S[0] / DAY_S:.12f}, {WARN_S[1] / DAY_S:.12f}]",
        f"renew_before_days = {RENEW_BEFORE_S / DAY_S:.12f}",
        "check_interval_s = 5",
    ]
    return text.replace(anchor, anchor + "\n" + "\n".join(lines))


def _api_server(node: Node) -> str:
    kubeconfig = yaml.safe_load((node.root / "etc/kubernetes/admin.conf").read_text())
    return str(kubeconfig["clusters"][0]["cluster"]["server"]).removeprefix("https://")


def _serving_cert(node: Node) -> dict[str, str]:
    """What `openssl s_client` sees at the API server, verified against the node's ca.crt."""
    ca = node.root / "etc/kubernetes/pki/ca.crt"
    out = subprocess.run(
        ["openssl", "s_client", "-connect", _api_server(node), "-CAfile", str(ca), "-servername", "localhost",
         "-verify_return_error"],
        input="", capture_output=True, text=True, timeout=20, check=False,
    )
    assert out.returncode == 0 and "Verify return code: 0 (ok)" in out.stdout, out.stdout[-2000:] + out.stderr
    fields = subprocess.run(["openssl", "x509", "-noout", "-serial", "-enddate", "-dates"], input=out.stdout,
                            capture_output=True, text=True, check=True).stdout
    parsed = dict(line.split("=", 1) for line in fields.splitlines() if "=" in line)
    return {"serial": parsed["serial"], "not_after": parsed["notAfter"]}


def _not_after_epoch(text: str) -> float:
    return time.mktime(time.strptime(text.replace(" GMT", ""), "%b %d %H:%M:%S %Y")) - time.timezone


def _workload_pods(node: Node) -> dict[str, str]:
    """name -> uid of every pod that is not a static pod's mirror (those are restarted on purpose)."""
    pods = json.loads(node.kubectl("get", "pods", "-A", "-o", "json"))["items"]
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p["metadata"]["uid"] for p in pods
            if "kubernetes.io/config.mirror" not in (p["metadata"].get("annotations") or {})}


@dataclass(frozen=True)
class Call:
    start: float  # monotonic
    end: float
    code: int
    stderr: str


@contextmanager
def _kubectl_throughout(node: Node) -> Iterator[list[Call]]:
    """`kubectl get pods -A` over and over in the background, one Call each."""
    results: list[Call] = []
    stop = threading.Event()
    kubeconfig = str(node.root / "etc/kubernetes/admin.conf")

    def poll() -> None:
        while not stop.is_set():
            start = time.monotonic()
            out = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "--request-timeout=5s", "get", "pods", "-A"],
                                 capture_output=True, text=True, check=False)
            results.append(Call(start, time.monotonic(), out.returncode, out.stderr.strip()[-300:]))
            time.sleep(0.1)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield results
    finally:
        stop.set()
        thread.join(timeout=15)


def _pids(root: Path, names: tuple[str, ...] = RESTARTED) -> dict[str, set[int]]:
    """Process ids under the node root, by program: static pods name theirs in SIMNODE_TOOL (they share the
    kubelet's zipapp), the kubelet is `<root>/usr/bin/kubelet`."""
    found: dict[str, set[int]] = {name: set() for name in names}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(arg.startswith(f"{root}/") for arg in argv):
            continue
        tool = next((v.removeprefix("SIMNODE_TOOL=") for v in environ if v.startswith("SIMNODE_TOOL=")), None)
        if tool is None and f"{root}/usr/bin/kubelet" in argv[:2]:
            tool = "kubelet"
        if tool in found:
            found[tool].add(int(entry.name))
    return found


def _all_restarted(before: dict[str, set[int]], after: dict[str, set[int]]) -> None:
    for name in before:  # a new process each: the old ones held the old certificates in memory
        assert after[name] and not after[name] & before[name], (name, before[name], after[name])


def _events_of(messages: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [payload(m)["data"] for m in messages if payload(m)["type"] == kind]


def _check_renewed(node: Node, renewed: dict[str, Any], before: dict[str, str], pods: dict[str, str]) -> None:
    files = set(renewed["files"])
    assert {"apiserver.crt", "apiserver.key", "etcd/server.crt", "front-proxy-client.crt", "admin.conf",
            "controller-manager.conf", "scheduler.conf", "super-admin.conf"} <= files, files
    assert "/var/lib/kubelet/pki/kubelet-client-current.pem" in files, "the kubelet's rotatable pem is renewed"
    assert not {"ca.crt", "ca.key", "etcd/ca.crt", "front-proxy-ca.key", "sa.key", "sa.pub"} & files, "CAs are kept"
    after = _serving_cert(node)  # verified by the same ca.crt
    assert after["serial"] != before["serial"]
    assert _not_after_epoch(after["not_after"]) > _not_after_epoch(before["not_after"])
    still = _workload_pods(node)
    assert pods.items() <= still.items(), f"pods lost or replaced: {set(pods.items()) - set(still.items())}"
    manifest = yaml.safe_load((node.root / "etc/kubernetes/manifests/kube-scheduler.yaml").read_text())
    assert "lifecycle/certs-renewed-at" in manifest["metadata"]["annotations"]


def _no_private_key_anywhere(node: Node, messages: list[dict[str, Any]]) -> None:
    """Neither the events of the whole install and renewal nor the service's log carry key material."""
    assert "PRIVATE KEY" not in json.dumps(messages)
    log = node.log_path.read_text()
    assert "renewed" in log and "PRIVATE KEY" not in log


def _api_gap_s(calls: list[Call], *, since: float, until: float, label: str) -> float:
    """The API may stop answering once, for the API server's own restart (a single node has no other): returns that
    gap, from the last answer before it to the first answer after it (0.0 if none), and prints it. Every other call
    succeeded, and no failure is an authentication error (the renewed admin.conf works throughout)."""
    during = [c for c in calls if since <= c.end <= until]
    assert len(during) >= 3, f"kubectl ran only {len(during)} times during the renewal"
    failed = [i for i, c in enumerate(calls) if c.code != 0]
    assert not [c for c in calls if "Unauthorized" in c.stderr or "logged in" in c.stderr], \
        [calls[i] for i in failed][:3]
    gap_s = 0.0
    if failed:
        first, last = failed[0], failed[-1]
        assert failed == list(range(first, last + 1)), f"the API went away more than once: {failed}"
        assert first > 0 and last + 1 < len(calls), "the API did not answer before or after the gap"
        gap_s = calls[last + 1].end - calls[first - 1].end
    print(f"\n{label}: the API did not answer for {gap_s:.2f} s ({len(failed)} failed calls of {len(calls)}); "
          f"renewal took {until - since:.1f} s")
    assert gap_s < API_GAP_BOUND_S, f"the API was away {gap_s:.1f} s: {[calls[i].stderr for i in failed][:3]}"
    return gap_s


def _dated_pem(node: Node) -> Path:
    """The dated file the kubelet's -current.pem links to (the kubelet's certificate store keeps it a symlink)."""
    current = node.root / KUBELET_PEM
    assert current.is_symlink(), (f"{current} is not a symlink: the kubelet cannot rotate it "
                                  f"({sorted(p.name for p in current.parent.iterdir())}); kubelet log: "
                                  f"{(node.root / 'var/log/lifecycle/kubelet.log').read_text()[-1500:]}")
    target = current.readlink()
    assert target.parent == current.parent, target
    assert re.fullmatch(r"kubelet-client-\d{4}(-\d\d){5}\.pem", target.name), target
    return target


def _kubelet_pem_renewed_and_rotatable(node: Node, *, before: Path, before_bytes: bytes) -> None:
    """The renewal put a new dated pem behind the symlink and kept the old one; then the kubelet's own rotation
    (forced by the kubelet_client_rotation_after_s knob) swaps the symlink again, without client-go's error."""
    renewed = _dated_pem(node)
    assert renewed != before and before.read_bytes() == before_bytes, "the previous dated pem is kept as it was"
    assert (node.root / KUBELET_PEM).read_bytes() == renewed.read_bytes() != before_bytes
    assert renewed.stat().st_mode & 0o777 == 0o600
    log = node.root / "var/log/lifecycle/kubelet.log"
    node.write_faults({"kubelet_client_rotation_after_s": 0})
    try:
        deadline = time.monotonic() + 30
        while _dated_pem(node) == renewed or "rotated the client certificate" not in log.read_text():
            assert "to be a symlink but it is a file" not in log.read_text(), log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"the kubelet did not rotate: {log.read_text()[-2000:]}"
            time.sleep(0.5)
    finally:
        node.write_faults(None)
    assert renewed.read_bytes() != _dated_pem(node).read_bytes()
    assert "to be a symlink but it is a file" not in log.read_text()


def _renewals(events: install_e2e.Subscriber) -> list[str]:
    """The request ids of the renewals that started so far, in order."""
    return [c["request_id"] for c in _events_of(events.messages, "lifecycle.state.changed") if c["to"] == "renewing"]


def _read_before_the_next_renewal(
    node: Node, events: install_e2e.Subscriber,
) -> tuple[dict[str, str], dict[str, str], set[str]]:
    """The serving certificate and the workload pods (one made here) read while no renewal runs, and the ids of the
    renewals that started before them. The leaves live LEAF_S and the first renewal comes ~40 s after the certs
    step issued them: on a slow machine the install itself may take that long (it did once in a clean-clone run).
    Then this waits for that renewal to end and reads again; the renewal issued new leaves, so the next one is
    again ~40 s away, and that is the one the test watches."""
    for attempt in range(3):
        seen = _renewals(events)
        if seen:
            _wait_state(events, "running", timeout_s=90, request_id=seen[-1])
        try:
            before = _serving_cert(node)
            node.kubectl("run", f"made-before-{attempt}", "--image=127.0.0.1:5000/pause:3.10", "--restart=Never")
            pods = _workload_pods(node)
        except (AssertionError, subprocess.CalledProcessError):
            if _renewals(events) == seen:
                raise  # not a renewal's API server restart
            continue
        if _renewals(events) == seen:
            return before, pods, set(seen)
    raise AssertionError(f"a renewal started each time the certificates were read: {_renewals(events)}")


def test_short_lived_certificates_warn_then_renew_automatically_while_kubectl_keeps_working(
    make_node: Callable[..., Node], record_property: Callable[[str, object], None],
) -> None:
    node = make_node(config_text=_short_lived_config())
    events = node.install_until_running("short-1")
    before, pods, earlier = _read_before_the_next_renewal(node, events)
    status = payload(node.retained("status", lambda m: payload(m).get("certs") is not None, timeout_s=10))
    assert status["certs"]["renew_at"] is not None and status["certs"]["file"], status

    with _kubectl_throughout(node) as calls:
        started = events.wait_for(lambda m: payload(m)["type"] == "lifecycle.state.changed"
                                  and payload(m)["data"]["to"] == "renewing"
                                  and payload(m)["data"]["request_id"] not in earlier, timeout_s=60)
        renewing_since = time.monotonic()
        auto_id = payload(started)["data"]["request_id"]
        assert auto_id.startswith("auto-renew-"), auto_id
        done = _wait_state(events, "running", timeout_s=90, request_id=auto_id)
        renewed_at = time.monotonic()
        assert done["data"]["to"] == "running", node.log_path.read_text()[-3000:]
        time.sleep(1.0)
    record_property("api_gap_s", _api_gap_s(calls, since=renewing_since, until=renewed_at, label="automatic renewal"))

    expiring = _events_of(events.messages, "lifecycle.certs.expiring")
    thresholds = [e["threshold_days"] for e in expiring][:2]
    assert thresholds == pytest.approx([WARN_S[0] / DAY_S, WARN_S[1] / DAY_S], rel=1e-6), expiring
    first = expiring[0]
    assert first["file"] and first["not_after"] and 0 < first["days_left"] <= WARN_S[0] / DAY_S
    assert first["renew_at"] is not None and first["request_id"] is None
    renewed = [e for e in _events_of(events.messages, "lifecycle.certs.renewed") if e["request_id"] == auto_id]
    assert len(renewed) == 1
    progress = {e["message"] for e in _events_of(events.messages, "lifecycle.step.progress")
                if e["request_id"] == auto_id}
    assert {f"renewed {name}" for name in renewed[0]["files"]} <= progress
    assert any(m.startswith("kube-apiserver restarted: the API did not answer for") for m in progress), progress
    _check_renewed(node, renewed[0], before, pods)
    later = payload(node.retained("status", lambda m: payload(m)["state"] == "running"
                                  and payload(m)["certs"]["earliest_expiry"] > status["certs"]["earliest_expiry"],
                                  timeout_s=10))
    assert later["request_id"] == auto_id
    _no_private_key_anywhere(node, events.messages)


def test_renew_certs_request_renews_on_demand_and_is_refused_when_nothing_runs(
    make_node: Callable[..., Node], record_property: Callable[[str, object], None],
) -> None:
    node = make_node()
    node.start_service()
    refused = payload(node.request({"id": "too-early", "action": "renew-certs"}, correlation="r0"))
    assert (refused["ok"], refused["error"]["code"], refused["state"]) == (False, "not_running", "idle")
    events = node.subscribe("events")
    assert payload(node.request({"id": "inst", "action": "install"}, correlation="r1"))["ok"] is True
    assert _wait_state(events, "running", timeout_s=120, request_id="inst")["data"]["to"] == "running"
    node.kubectl("run", "made-before", "--image=127.0.0.1:5000/pause:3.10", "--restart=Never")
    pods = _workload_pods(node)
    before = _serving_cert(node)
    ca_before = (node.root / "etc/kubernetes/pki/ca.crt").read_bytes()
    pem_before = _dated_pem(node)  # the kubelet's store made it at its first start; kubelet-finalize points at it
    pem_before_bytes = pem_before.read_bytes()
    pids_before = _pids(node.root)
    assert all(pids_before.values()), pids_before

    with _kubectl_throughout(node) as calls:
        time.sleep(0.5)
        since = time.monotonic()
        reply = payload(node.request({"id": "renew-1", "action": "renew-certs"}, correlation="r2"))
        assert (reply["ok"], reply["state"], reply["request_id"], reply["note"]) == (
            True, "renewing", "renew-1", "renewal started"), reply
        done = _wait_state(events, "running", timeout_s=90, request_id="renew-1")
        until = time.monotonic()
        assert done["data"]["to"] == "running", node.log_path.read_text()[-3000:]
    record_property("api_gap_s", _api_gap_s(calls, since=since, until=until, label="renew-certs request"))

    renewed = [e for e in _events_of(events.messages, "lifecycle.certs.renewed") if e["request_id"] == "renew-1"]
    assert len(renewed) == 1
    _check_renewed(node, renewed[0], before, pods)
    _all_restarted(pids_before, _pids(node.root))  # kube-apiserver too: its kubelet client certificate
    progress = [e["message"] for e in _events_of(events.messages, "lifecycle.step.progress")
                if e["request_id"] == "renew-1"]
    assert any(m.startswith("kube-apiserver restarted: the API did not answer for") for m in progress), progress
    _kubelet_pem_renewed_and_rotatable(node, before=pem_before, before_bytes=pem_before_bytes)
    assert (node.root / "etc/kubernetes/pki/ca.crt").read_bytes() == ca_before
    changes = [(c["from"], c["to"]) for c in _events_of(events.messages, "lifecycle.state.changed")
               if c["request_id"] == "renew-1"]
    assert changes == [("running", "renewing"), ("renewing", "running")]
    _no_private_key_anywhere(node, events.messages)

    # The CLI: `lifecycle renew-certs` follows the renewal to its end, `lifecycle status` shows the first expiry.
    flags = ["--config", str(node.config_path), "--node", node.name, "--timeout", "20"]
    renewed_again = _cli("renew-certs", *flags)
    assert renewed_again.returncode == 0 and "done: running" in renewed_again.stdout, renewed_again
    # The certificate watch may publish a newer status (the kubelet rotates its client certificate after the
    # renewal) between the retained message read here and the CLI's own read: both again until they agree.
    deadline_s = time.monotonic() + 20
    while True:
        status = payload(node.retained("status", lambda m: payload(m)["state"] == "running", timeout_s=10))
        shown = _cli("status", *flags)
        assert shown.returncode == 0, shown
        expiry = f"certificates: the first expires {status['certs']['earliest_expiry']} ({status['certs']['file']})"
        if expiry in shown.stdout or time.monotonic() > deadline_s:
            break
        time.sleep(0.5)
    assert expiry in shown.stdout, shown.stdout
    # ... and how long each install step usually takes on this node (issue #11: durations that mean something).
    usual = status["usual_s"]
    assert {"certs", "kubeadm", "readiness"} <= set(usual) and usual["readiness"] > 0, usual
    [line] = [line for line in shown.stdout.splitlines() if line.startswith("  steps usually take: ")]
    assert f"certs {usual['certs']:g} s" in line and f"readiness {usual['readiness']:g} s" in line, shown.stdout
    assert status["slow"] is None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LIFECYCLE), *args], capture_output=True, text=True, timeout=60, check=False)
