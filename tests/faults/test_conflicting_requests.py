"""Conflicting requests at every state of the real `lifecycle serve` on the simulated node, over MQTT: each request
kind (and pairs sent back to back) gets the reply docs/protocol.md ("Outcomes") documents, the service keeps
answering `status`, and it ends consistent: a reset ends `idle` with nothing of the node running or left in the
engine, an install ends `running`. Requests go out the moment a state is announced (faultlib.Driver); the
simulated node holds kubeadm, kubelet and readiness for a while (simnode/faults.py) so those are hit surely."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faultlib import (
    INSTALL_CHAIN,
    Driver,
    Node,
    _kill_processes_under,
    engine_leftovers,
    kubelets_under,
    make_node,
    processes_under,
    wait_until,
)

__all__ = ["make_node"]  # the fixture, used by name

INSTALL_STATES = INSTALL_CHAIN[1:-1]  # preflight ... addons
HELD = {"kubeadm", "kubelet", "readiness"}  # held by HOLDS: the batch surely lands in them
HOLDS = {"delays_s": {"kubeadm_phase": 0.4, "kubelet_start": 2.0, "apiserver_ready": 2.0}}
OTHER_VERSION = "v1.32.1"  # simnode/lifecycle.toml installs v1.31.4 unless told


@pytest.fixture
def node_and_driver(make_node: Callable[..., Node]) -> Iterator[tuple[Node, Driver]]:
    node = make_node()
    node.write_faults(HOLDS)
    node.start_service()
    driver = Driver(node)
    yield node, driver
    driver.close()


def _ok(reply: dict[str, Any], *, note: str | None = None, request_id: str | None = None) -> None:
    assert reply["ok"] is True and reply["error"] is None, reply
    if note is not None:
        assert reply["note"] == note, reply
    if request_id is not None:
        assert reply["request_id"] == request_id, reply


def _refused(reply: dict[str, Any], code: str) -> None:
    assert reply["ok"] is False and reply["error"]["code"] == code, reply


def _asks(prefix: str, *kinds: str) -> list[dict[str, Any]]:
    bodies = {"status": {"action": "status"}, "install": {"action": "install"}, "reset": {"action": "reset"},
              "other": {"action": "install", "kubernetes_version": OTHER_VERSION}, "cancel": {"action": "cancel"},
              "renew": {"action": "renew-certs"}, "kubeconfig": {"action": "kubeconfig"},
              "first": {"action": "install"}, "resume": {"action": "install"}}
    return [{"id": f"{prefix}-{kind}", **bodies[kind.rstrip("0123456789")]} for kind in kinds]


def _assert_clean(node: Node, d: Driver) -> None:
    wait_until(lambda: not processes_under(node.root), timeout_s=10,
               what=f"processes of the node still running: {processes_under(node.root)}")
    assert kubelets_under(node.root) == []
    left = engine_leftovers(node.name)
    assert left == [], (d.tos(), subprocess.run(["docker", "inspect", *left], capture_output=True, text=True).stdout)


def test_every_request_in_every_install_state_then_running_renewing_resetting_idle(
    node_and_driver: tuple[Node, Driver],
) -> None:
    node, driver = node_and_driver
    d = driver
    # In every install state: the requests that leave the install alone, then cancel + install back to back
    # (in kubelet: cancel alone, then the requests of `failed`, then the install).
    for state in INSTALL_STATES:
        kinds = ["status", "install", "other", "renew", "kubeconfig", "cancel"]
        d.arm(state, _asks(state, *kinds, *([] if state == "kubelet" else ["resume"])))
    d.send(*_asks("idle", "cancel", "renew", "kubeconfig", "status", "first"))
    _ok(d.reply("idle-cancel"), note="nothing to cancel")
    _refused(d.reply("idle-renew"), "not_running")
    _refused(d.reply("idle-kubeconfig"), "not_ready")
    assert d.reply("idle-status")["status"]["state"] == "idle"
    _ok(d.reply("idle-first"), note="install started", request_id="idle-first")
    install, seen = "idle-first", {}
    for state in INSTALL_STATES:
        if state in d.missed:
            continue
        status = d.reply(f"{state}-status", timeout_s=120)
        at = seen[state] = status["status"]["state"]
        assert at in INSTALL_STATES, status
        _ok(d.reply(f"{state}-install"), note="already installing", request_id=install)
        _refused(d.reply(f"{state}-other"), "upgrade_unsupported")
        _refused(d.reply(f"{state}-renew"), "not_running")
        kubeconfig = d.reply(f"{state}-kubeconfig")
        if INSTALL_STATES.index(at) > INSTALL_STATES.index("certs"):  # admin.conf is written by certs
            _ok(kubeconfig)
            assert "client-key-data" in kubeconfig["kubeconfig"]
        elif not kubeconfig["ok"]:
            _refused(kubeconfig, "not_ready")
        cancel = d.reply(f"{state}-cancel")
        _ok(cancel, request_id=install)
        assert cancel["note"].removeprefix("cancelled in ") in INSTALL_STATES, cancel
        if state in HELD:
            assert at == state and cancel["note"] == f"cancelled in {state}", (status, cancel)
        if state == "kubelet":  # failed, with the cancel as its error
            d.send(*_asks("failed", "status", "cancel", "other", "renew", "kubeconfig", "install"))
            failed = d.reply("failed-status")["status"]
            assert (failed["state"], failed["error"]["code"]) == ("failed", "cancelled"), failed
            _ok(d.reply("failed-cancel"), note="nothing to cancel")
            _refused(d.reply("failed-other"), "upgrade_unsupported")
            _refused(d.reply("failed-renew"), "not_running")
            _ok(d.reply("failed-kubeconfig"))
            _ok(d.reply("failed-install"), note="install resumed", request_id="failed-install")
            install = "failed-install"
        else:
            _ok(d.reply(f"{state}-resume"), note="install resumed", request_id=f"{state}-resume")
            install = f"{state}-resume"
    running = d.wait_state("running")
    assert not HELD & set(d.missed), f"held states passed before their requests: {d.missed}"
    print(f"\nbatches landed in {seen}; passed before the requests arrived: {d.missed}")
    # Each cancel ended in failed, and the install resumed by re-entering the state it cancelled.
    tos = d.tos()[:running + 1]
    for i, to in enumerate(tos):
        if to == "failed":
            assert tos[i + 1] == tos[i - 1], tos

    node.write_faults(None)
    d.send(*_asks("running", "status", "install", "other", "cancel", "kubeconfig"))
    assert d.reply("running-status")["status"]["state"] == "running"
    _ok(d.reply("running-install"), note="already running", request_id=install)
    _refused(d.reply("running-other"), "upgrade_unsupported")
    _ok(d.reply("running-cancel"), note="nothing to cancel")
    _ok(d.reply("running-kubeconfig"))

    # renewing, then reset + reset back to back (a reset interrupts a renewal), then resetting, then idle.
    d.arm("renewing", _asks("renewing", "status", "install", "other", "cancel", "renew", "kubeconfig", "reset1",
                            "reset2"))
    d.arm("resetting", _asks("resetting", "status", "install", "cancel", "renew", "kubeconfig", "reset"))
    d.send(*_asks("running", "renew"))
    _ok(d.reply("running-renew"), note="renewal started", request_id="running-renew")
    assert d.reply("running-renew")["state"] == "renewing"
    assert d.reply("renewing-status")["status"]["state"] == "renewing"
    _refused(d.reply("renewing-install"), "busy")
    _refused(d.reply("renewing-other"), "busy")
    _refused(d.reply("renewing-cancel"), "not_cancellable")
    _ok(d.reply("renewing-renew"), note="already renewing", request_id="running-renew")
    _ok(d.reply("renewing-kubeconfig"))
    _ok(d.reply("renewing-reset1"), request_id="renewing-reset1")
    assert d.reply("renewing-reset1")["state"] == "resetting"
    _ok(d.reply("renewing-reset2"), note="already resetting", request_id="renewing-reset1")
    assert d.reply("resetting-status")["status"]["state"] == "resetting"
    _refused(d.reply("resetting-install"), "busy")
    _refused(d.reply("resetting-cancel"), "not_cancellable")
    _refused(d.reply("resetting-renew"), "not_running")
    _refused(d.reply("resetting-kubeconfig"), "not_ready")
    _ok(d.reply("resetting-reset"), note="already resetting", request_id="renewing-reset1")
    d.wait_state("idle", after=running)
    # Every state change reached the driver once, in order (the bridge publishes up to 20 at once; the driver
    # stayed connected throughout): the walk above is the service's whole walk.
    seqs = [c["state_seq"] for c in d.changes]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (seqs, d.tos())
    _assert_clean(node, d)
    d.send(*_asks("end", "status"))
    assert d.reply("end-status")["status"]["state"] == "idle"


def test_reset_in_every_install_state_ends_idle_with_nothing_running(node_and_driver: tuple[Node, Driver]) -> None:
    node, d = node_and_driver
    # install + reset back to back from idle
    d.send(*_asks("idle", "install", "reset"))
    _ok(d.reply("idle-install"), note="install started", request_id="idle-install")
    _ok(d.reply("idle-reset"), note="reset started", request_id="idle-reset")
    d.wait_state("idle", request_id="idle-reset")
    _assert_clean(node, d)
    landed: dict[str, str] = {}
    for state in INSTALL_STATES:
        # reset + reset back to back the moment the state is announced, then a status
        d.arm(state, _asks(state, "reset1", "reset2", "status"))
        d.send(*_asks(f"{state}-start", "install"))
        _ok(d.reply(f"{state}-start-install"), note="install started", request_id=f"{state}-start-install")
        first, second = d.reply(f"{state}-reset1", timeout_s=120), d.reply(f"{state}-reset2")
        _ok(first, note="reset started", request_id=f"{state}-reset1")
        status = d.reply(f"{state}-status")["status"]
        assert status["state"] in ("resetting", "idle"), (status, d.tos())
        if second["note"] == "reset started":  # the first reset had already ended: the second is a new one
            _ok(second, request_id=f"{state}-reset2")
            assert d.wait_state("idle", request_id=f"{state}-reset1") < d.wait_state("resetting",
                                                                                   request_id=f"{state}-reset2")
        else:
            _ok(second, note="already resetting", request_id=f"{state}-reset1")
        d.wait_state("idle", request_id=second["request_id"])
        interrupted = landed[state] = d.changes[d.wait_state("resetting", request_id=f"{state}-reset1")]["from"]
        assert interrupted in INSTALL_STATES and (interrupted == state or state not in HELD), d.tos()
        _assert_clean(node, d)
    assert not HELD & set(d.missed), f"held states passed before their requests: {d.missed}"
    print(f"\nresets interrupted (armed state: state interrupted): {landed}")


def test_requests_during_the_quiet_recheck_after_a_restart(node_and_driver: tuple[Node, Driver]) -> None:
    """A reboot: service and node processes gone, saved state `running`. The requests sent the moment the
    restarted service is online meet the boot (the quiet re-check, issue 8 #4; since issue 10 part 3 a fast path
    that enters `kubelet` within a second); it brings the node back whatever they ask."""
    node, d = node_and_driver
    node.write_faults(None)
    d.send(*_asks("idle", "install"))
    running = d.wait_state("running")
    node.kill_service()
    _kill_processes_under(node.root)
    wait_until(lambda: not processes_under(node.root), timeout_s=10, what="node processes gone")
    d.arm("online", _asks("restart", "status", "cancel", "renew", "install", "other", "kubeconfig"))
    node.start_service()
    assert d.reply("restart-status")["status"]["state"] == "running"
    cancel = d.reply("restart-cancel")
    assert cancel["state"] in ("running", "kubelet", "readiness", "addons"), cancel
    _ok(cancel, note="nothing to cancel")
    _refused(d.reply("restart-renew"), "busy")  # only while a job runs: the boot was under way
    install = d.reply("restart-install")
    assert install["note"] in ("already running", "already booting"), install
    _ok(install, request_id="idle-install")
    _refused(d.reply("restart-other"), "upgrade_unsupported")
    _ok(d.reply("restart-kubeconfig"))
    # The re-check found the kubelet gone and repaired: running -> <a step> -> ... -> running.
    repaired = d.wait_state("running", after=running + 1)
    assert d.changes[running + 1]["from"] == "running" and d.changes[running + 1]["to"] in INSTALL_STATES, d.tos()
    assert d.changes[repaired]["request_id"] == "idle-install"
    wait_until(lambda: len(kubelets_under(node.root)) == 1, timeout_s=10, what="not exactly one kubelet")
    assert " Ready " in node.kubectl("get", "nodes", node.name)
