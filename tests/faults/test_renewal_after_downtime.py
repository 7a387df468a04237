"""A service that was down when renewal fell due, on the simulated node through the real service: SIGKILLed
before renewal is due, started again once it is overdue and the leaves are within the certs state's margin. The
quiet re-check goes through the renewal routine, not the plain certs repair: `lifecycle.certs.renewed`, a new
kubelet and control-plane processes, kubelet.conf still on the kubelet pem, kubectl working throughout, and the
kubelet keeps renewing its Lease (with its new client certificate) after the old certificates expired.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import faultlib  # noqa: F401 (puts tests/e2e on sys.path first)
import test_install_over_mqtt as install_e2e
import yaml
from cryptography import x509
from test_cert_renewal import (
    RESTARTED,
    _all_restarted,
    _api_gap_s,
    _events_of,
    _kubectl_throughout,
    _pids,
    _short_lived_config,
)
from test_install_over_mqtt import Node, payload

make_node = install_e2e.make_node  # the fixture: a service of its own on a fresh root, killed in teardown

DAY_S = 86400.0
# The test lasts about LEAF_S + 15 s, most of it waiting for the clock: keep it short, but leave the install the
# time until renewal is due.
LEAF_S = 80.0  # the certs state's margin is a tenth of it: 8 s
RENEW_BEFORE_S = 30.0  # renewal due 50 s after issue: the install must be over (and the service killed) by then
# Inside the 8 s margin, early enough to write the new files before the old leaves expire (a started service
# writes them within about a second, even on a busy machine; the restarts, up to kube-apiserver's, last, may end
# after that: the old processes keep working until then).
RESTART_BEFORE_END_S = 6.5
KUBELET_PEM = "var/lib/kubelet/pki/kubelet-client-current.pem"


def _config() -> str:
    text = _short_lived_config()  # its lifetimes are replaced below; the keys must all be there
    lines = [line for line in text.splitlines() if not line.startswith(("cert_validity_days", "renew_before_days"))]
    anchor = lines.index('key_algorithm = "ecdsa-p256"')
    lines[anchor + 1:anchor + 1] = [f"cert_validity_days = {LEAF_S / DAY_S:.12f}",
                                    f"renew_before_days = {RENEW_BEFORE_S / DAY_S:.12f}"]
    return "\n".join(lines) + "\n"


def _not_after(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def _lease_renewed(node: Node) -> float:
    leases = json.loads(node.kubectl("get", "leases", "-n", "kube-node-lease", "-o", "json"))["items"]
    assert leases, "no node lease"
    times = [datetime.strptime(lease["spec"]["renewTime"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
             for lease in leases]
    return max(times)


def test_service_down_when_renewal_fell_due_renews_on_start_and_restarts_what_reads_the_files(
    make_node: Callable[..., Node], record_property: Callable[[str, object], None],
) -> None:
    node = make_node(config_text=_config())
    events = node.install_until_running("down-1")
    node.kill_service()
    pki = node.root / "etc/kubernetes/pki"
    old_end = min(_not_after(pki / "apiserver.crt"), _not_after(node.root / KUBELET_PEM))
    due_at = old_end - RENEW_BEFORE_S
    assert time.time() < due_at, f"the install took too long: renewal fell due {time.time() - due_at:.1f} s ago"
    assert not _events_of(events.messages, "lifecycle.certs.renewed")
    before = _pids(node.root)
    assert all(before.values()), before
    old_pem = (node.root / KUBELET_PEM).read_bytes()

    time.sleep(max(0.0, old_end - RESTART_BEFORE_END_S - time.time()))
    with _kubectl_throughout(node) as calls:
        since = time.monotonic()
        node.start_service()
        events.wait_for(lambda m: payload(m)["type"] == "lifecycle.step.progress"
                        and payload(m)["data"]["message"] == "renewed apiserver.crt", timeout_s=60)
        assert time.time() < old_end, "renewed only after the old certificates had expired"
        renewed = events.wait_for(lambda m: payload(m)["type"] == "lifecycle.certs.renewed", timeout_s=60)
        renewed_seq = payload(renewed)["data"]["seq"]
        done = payload(events.wait_for(lambda m: payload(m)["type"] == "lifecycle.state.changed"
                                       and payload(m)["data"]["seq"] > renewed_seq
                                       and payload(m)["data"]["to"] in ("running", "failed"), timeout_s=60))
        until = time.monotonic()
        assert done["data"]["to"] == "running", node.log_path.read_text()[-3000:]
    record_property("api_gap_s", _api_gap_s(calls, since=since, until=until, label="renewal after downtime"))

    files = set(payload(renewed)["data"]["files"])
    assert {"apiserver.crt", "admin.conf", f"/{KUBELET_PEM}"} <= files, files
    assert "kubelet.conf" not in files
    kubelet_conf = yaml.safe_load((node.root / "etc/kubernetes/kubelet.conf").read_text())
    user = kubelet_conf["users"][0]["user"]
    assert user.get("client-certificate") == f"/{KUBELET_PEM}" and "client-certificate-data" not in user, user
    assert (node.root / KUBELET_PEM).read_bytes() != old_pem
    assert _not_after(node.root / KUBELET_PEM) > old_end + LEAF_S / 2
    assert (node.root / KUBELET_PEM).is_symlink(), "the kubelet's store needs its -current.pem a symlink"
    _all_restarted(before, _pids(node.root))
    assert set(before) == set(RESTARTED)
    changes = [(c["from"], c["to"]) for c in _events_of(events.messages, "lifecycle.state.changed")
               if c["request_id"] == "down-1"]
    assert ("running", "certs") in changes and changes[-1] == ("addons", "running"), changes

    # The kubelet's session uses the new certificate: its Lease keeps being renewed after the old one expired.
    deadline = old_end + 40
    while (renewed_at := _lease_renewed(node)) <= old_end + 2:
        assert time.time() < deadline, f"the node lease was last renewed at {renewed_at}, old certs ended {old_end}"
        time.sleep(1)
    # The restarted API server uses the renewed kubelet client certificate (it reads it only at start): `kubectl
    # logs` (API server -> kubelet) works after the old one expired.
    etcd = node.kubectl("get", "pods", "-n", "kube-system", "-l", "component=etcd", "-o", "name").split()[0]
    assert "etcd" in node.kubectl("logs", "-n", "kube-system", etcd, "--tail=5")
    assert "PRIVATE KEY" not in json.dumps(events.messages)
