"""The admin key and the service's file descriptors, seen from outside the real `lifecycle serve` (issue 8,
defects 7 and 9): a SIGKILL while the service talks to the API leaves no copy of the admin key outside the node
root, and install→reset cycles leave no descriptor behind. The service runs with a TMPDIR of the test's own, so
whatever it (or the simulated node it starts) would put in a temp dir is found there.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import faultlib  # noqa: F401 (puts tests/e2e on sys.path first)
import pytest
import test_install_over_mqtt as install_e2e
import yaml
from test_install_over_mqtt import Node, _wait_state, payload

make_node = install_e2e.make_node  # the fixture: a service of its own on a fresh root, killed in teardown

READY_WAIT = "to be Ready"  # the readiness step's progress message when it opens its API watch (states/readiness.py)


def test_sigkill_during_readiness_leaves_no_admin_key_and_cycles_leave_no_descriptors(
    make_node: Callable[..., Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    service_tmp = tmp_path / "service-tmp"
    service_tmp.mkdir(mode=0o700)
    monkeypatch.setenv("TMPDIR", str(service_tmp))  # inherited by the service and every process it starts
    legacy = service_tmp / "lifecycle-kube-legacy"  # what a killed older version left: removed at start
    legacy.mkdir(mode=0o700)
    (legacy / "tmpkey").write_text("-----BEGIN EC PRIVATE KEY-----\n")
    node = make_node()
    node.start_service()
    assert not legacy.exists()
    events = node.subscribe("events")
    assert payload(node.request({"id": "kill-me", "action": "install"}, correlation="k1"))["ok"] is True
    assert _wait_state(events, "readiness", timeout_s=180)["data"]["to"] == "readiness", _log_tail(node)

    # Kill while the API is being watched: at once if a key dir shows up (e8fddf8), else shortly after the watch
    # has been opened.
    events.wait_for(lambda m: READY_WAIT in str(payload(m)["data"].get("message", "")), timeout_s=120)
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline and not list(service_tmp.glob("lifecycle-kube-*")):
        time.sleep(0.01)
    node.kill_service()
    states = [payload(m)["data"]["to"] for m in events.messages if payload(m)["type"] == "lifecycle.state.changed"]
    assert states[-1] in ("readiness", "addons"), f"killed in {states[-1]}, not while talking to the API"

    admin_conf = node.root / "etc/kubernetes/admin.conf"
    key_pem = base64.b64decode(yaml.safe_load(admin_conf.read_text())["users"][0]["user"]["client-key-data"])
    assert _files_holding(key_pem, service_tmp) == []
    assert _files_holding(key_pem, node.root) == [admin_conf]  # kubeadm's kubeconfig, and no scratch copy

    node.start_service()  # resumes the install, then a reset and one more cycle: descriptors must not grow
    assert _wait_state(events, "running", timeout_s=240)["data"]["to"] == "running", _log_tail(node)
    fds_after: list[int] = []
    for cycle in (1, 2):
        if cycle == 2:
            request = {"id": f"install-{cycle}", "action": "install"}
            assert payload(node.request(request, correlation=f"i{cycle}"))["ok"] is True
            reached = _wait_state(events, "running", timeout_s=240, request_id=f"install-{cycle}")
            assert reached["data"]["to"] == "running", _log_tail(node)
        assert payload(node.request({"id": f"reset-{cycle}", "action": "reset"}, correlation=f"r{cycle}"))["ok"]
        idle = _wait_state(events, "idle", timeout_s=120, request_id=f"reset-{cycle}")
        assert idle["data"]["to"] == "idle", _log_tail(node)
        fds_after.append(_settled_fd_count(node, at_most=fds_after[0] if fds_after else None))
    print(f"service fds after reset 1: {fds_after[0]}, after reset 2: {fds_after[1]}")
    assert fds_after[1] - fds_after[0] <= 0, sorted(_fd_targets(node))
    assert _deleted_fds(node) == []
    assert _files_holding(key_pem, service_tmp) == []
    assert _files_holding(key_pem, node.root) == []  # the reset removed admin.conf; no copy anywhere else


def _files_holding(secret: bytes, directory: Path) -> list[Path]:
    """Files under `directory` (of at most 1 MiB: the binaries are not read) that contain `secret`, as it is or
    base64-encoded as a kubeconfig holds it."""
    forms = (secret.strip(), base64.b64encode(secret))
    found = []
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size <= 1 << 20:
            try:
                content = path.read_bytes()
            except OSError:  # a socket or a file removed meanwhile
                continue
            if any(form in content for form in forms):
                found.append(path)
    return found


def _fd_targets(node: Node) -> list[str]:
    assert node.service is not None
    targets = []
    for fd in Path(f"/proc/{node.service.pid}/fd").iterdir():
        try:
            targets.append(str(fd.readlink()))
        except OSError:
            continue
    return targets


def _deleted_fds(node: Node) -> list[str]:
    return [t for t in _fd_targets(node) if t.endswith("(deleted)")]


def _settled_fd_count(node: Node, *, at_most: int | None) -> int:
    """The service's descriptor count once idle connections are gone: waits up to 20 s for it to fall to
    `at_most` (aiohttp keeps an idle connection, to the Docker Engine for one, open for 15 s)."""
    deadline = time.monotonic() + 20
    count = len(_fd_targets(node))
    while at_most is not None and count > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
        count = len(_fd_targets(node))
    return count


def _log_tail(node: Node) -> str:
    return node.log_path.read_text()[-3000:]
