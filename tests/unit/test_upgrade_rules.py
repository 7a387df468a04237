"""The version rules an `upgrade` request is checked against before anything changes (lifecycle.upgrade), and the
upgrade's place in the state graph (lifecycle.machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.errors import RequestError
from lifecycle.machine import PREEMPTS, UPGRADE_STATES, State, StateMachine
from lifecycle.paths import HostPaths
from lifecycle.protocol import Action
from lifecycle.upgrade import UpgradeRecord, check_upgrade, control_plane_version, read_record, write_record


@pytest.mark.parametrize(("current", "target", "why"), [
    ("v1.31.4", "v1.31.4", "already runs"),
    ("v1.32.1", "v1.31.4", "downgrades are not supported"),
    ("v1.32.1", "v1.32.0", "downgrades are not supported"),
    ("v1.31.4", "v1.33.0", "skips a minor version"),
    ("v1.31.4", "v2.31.4", "changes the major version"),
])
def test_forbidden_upgrades_are_refused_with_the_rule(current: str, target: str, why: str) -> None:
    with pytest.raises(RequestError) as info:
        check_upgrade(current, target)
    assert info.value.code == "upgrade_not_allowed" and why in info.value.message


@pytest.mark.parametrize(("current", "target"), [("v1.31.4", "v1.32.1"), ("v1.31.4", "v1.31.5"),
                                                 ("v1.31.4", "v1.32.0")])
def test_one_minor_or_a_patch_up_is_allowed(current: str, target: str) -> None:
    check_upgrade(current, target)


def test_the_graph_goes_through_every_upgrade_state_and_back_to_running() -> None:
    machine = StateMachine(State.RUNNING)
    for state in UPGRADE_STATES:
        machine.move(state)
    machine.move(State.RUNNING)
    assert machine.current == State.RUNNING


def test_an_upgrade_returns_to_running_only_before_the_control_plane_changed() -> None:
    for state in UPGRADE_STATES:
        assert StateMachine(state).allows(State.RUNNING) == (
            UPGRADE_STATES.index(state) <= UPGRADE_STATES.index(State.UPGRADE_APPLY)
            or state == UPGRADE_STATES[-1])
        assert StateMachine(state).allows(State.FAILED) and StateMachine(state).allows(State.RESETTING)
    assert set(UPGRADE_STATES) <= PREEMPTS[Action.RESET] and not set(UPGRADE_STATES) & PREEMPTS[Action.CANCEL]


def test_the_record_and_the_manifest_version_are_read_back(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    assert read_record(paths) is None and control_plane_version(paths) is None
    write_record(paths, UpgradeRecord(from_version="v1.31.4", to_version="v1.32.1"))
    assert read_record(paths) == UpgradeRecord(from_version="v1.31.4", to_version="v1.32.1")
    paths.manifests_dir.mkdir(parents=True)
    (paths.manifests_dir / "kube-apiserver.yaml").write_text(
        "spec:\n  containers:\n  - command:\n    - kube-apiserver\n"
        "    image: 127.0.0.1:5000/ns/kube-apiserver:v1.32.1\n")
    assert control_plane_version(paths) == "v1.32.1"


def test_the_cli_shows_upgrade_steps_as_the_machine_names_them() -> None:
    from lifecycle import cli_render

    assert tuple(s.value for s in UPGRADE_STATES) == cli_render._UPGRADE_STATES
