"""The declared state graph and the pre-emption table."""

from __future__ import annotations

import pytest

from lifecycle.config import STEP_NAMES
from lifecycle.machine import INSTALL_STATES, PREEMPTS, IllegalTransitionError, State, StateMachine, mermaid
from lifecycle.protocol import Action


def test_the_install_chain_in_order_ends_in_running() -> None:
    m = StateMachine(State.IDLE)
    for name in (*STEP_NAMES, "running"):
        m.move(State(name))
    assert m.current == State.RUNNING


@pytest.mark.parametrize(
    ("start", "dest"),
    [
        (State.IDLE, State.IMAGES),  # no skipping ahead
        (State.CERTS, State.BINARIES),
        (State.IMAGES, State.CERTS),  # no going back
        (State.RUNNING, State.FAILED),
        (State.IDLE, State.FAILED),
        (State.RESETTING, State.RUNNING),
        (State.FAILED, State.RUNNING),
        (State.FAILED, State.IDLE),
    ],
)
def test_illegal_transitions_are_refused_and_change_nothing(start: State, dest: State) -> None:
    m = StateMachine(start)
    with pytest.raises(IllegalTransitionError):
        m.move(dest)
    assert m.current == start


@pytest.mark.parametrize("state", INSTALL_STATES)
def test_every_install_state_may_fail_be_reset_and_be_resumed(state: State) -> None:
    m = StateMachine(state)
    m.move(State.FAILED)
    m.move(state)  # resume enters the failed step's state
    m.move(State.RESETTING)
    m.move(State.IDLE)
    m2 = StateMachine(State.RUNNING)
    m2.move(state)  # repair after a restart
    assert m2.current == state


def test_reset_from_everywhere_but_resetting() -> None:
    for state in State:
        assert StateMachine(state).allows(State.RESETTING) == (state != State.RESETTING)
    m = StateMachine(State.RESETTING)
    m.move(State.FAILED)


def test_nothing_preempts_a_reset_and_install_preempts_nothing() -> None:
    assert State.RESETTING not in PREEMPTS[Action.RESET] | PREEMPTS[Action.CANCEL]
    assert set(INSTALL_STATES) <= PREEMPTS[Action.RESET] and set(INSTALL_STATES) <= PREEMPTS[Action.CANCEL]
    assert not PREEMPTS[Action.INSTALL] and not PREEMPTS[Action.STATUS]


def test_mermaid_diagram_shows_every_state_and_edge() -> None:
    text = mermaid()
    assert "stateDiagram-v2" in text and "[*] --> idle" in text
    for state in State:
        assert f'state "{state.value}" as {state.value}' in text
    for edge in ("idle --> preflight: install", "preflight --> certs: next", "addons --> running: next",
                 "images --> failed: fail", "failed --> images: resume", "running --> kubelet: repair",
                 "resetting --> idle: reset_done"):
        assert edge in text
