"""The state graph, declared once with `transitions`, and which request may pre-empt which state. No I/O.

The engine asks `StateMachine.move(dest)` before every state change, so an illegal change is a bug caught at
once; `lifecycle graph` prints the same graph as a Mermaid diagram.
"""

from __future__ import annotations

import itertools
from enum import StrEnum
from typing import Any

from transitions import Machine, MachineError

from lifecycle.config import STEP_NAMES
from lifecycle.protocol import Action


class State(StrEnum):
    IDLE = "idle"
    PREFLIGHT = "preflight"
    CERTS = "certs"
    IMAGES = "images"
    BINARIES = "binaries"
    NETWORK = "network"
    KUBEADM = "kubeadm"
    KUBELET = "kubelet"
    READINESS = "readiness"
    ADDONS = "addons"
    RUNNING = "running"
    FAILED = "failed"
    RESETTING = "resetting"
    RENEWING = "renewing"
    STOPPED = "stopped"
    UPGRADE_IMAGES = "upgrade_images"
    UPGRADE_BINARIES = "upgrade_binaries"
    UPGRADE_PLAN = "upgrade_plan"
    UPGRADE_APPLY = "upgrade_apply"
    UPGRADE_KUBELET = "upgrade_kubelet"
    UPGRADE_READINESS = "upgrade_readiness"


INSTALL_STATES: tuple[State, ...] = tuple(State(name) for name in STEP_NAMES)
# The upgrade in place, in the order kubeadm documents for a control-plane node (docs/protocol.md "Upgrade"):
# the new images and binaries come in while the old version runs; `kubeadm upgrade apply` is the first step that
# changes the cluster.
UPGRADE_STATES: tuple[State, ...] = (
    State.UPGRADE_IMAGES, State.UPGRADE_BINARIES, State.UPGRADE_PLAN, State.UPGRADE_APPLY, State.UPGRADE_KUBELET,
    State.UPGRADE_READINESS,
)
# Up to and including this state a failure leaves the old version running (kubeadm rolls its static pods back).
UPGRADE_LAST_UNCHANGED = State.UPGRADE_APPLY

# The graph. Each entry: (trigger, sources, destination). Resume and repair may enter any install state: the
# engine enters the first step whose outcome no longer holds (normally the one that failed).
_EDGES: list[tuple[str, list[State], State]] = [
    ("install", [State.IDLE], INSTALL_STATES[0]),
    *[("next", [a], b) for a, b in itertools.pairwise(INSTALL_STATES)],
    ("next", [INSTALL_STATES[-1]], State.RUNNING),
    ("fail", [*INSTALL_STATES, State.RESETTING], State.FAILED),
    *[("resume", [State.FAILED], s) for s in INSTALL_STATES],
    *[("repair", [State.RUNNING], s) for s in INSTALL_STATES],
    ("reset", [State.IDLE, State.RUNNING, State.FAILED, *INSTALL_STATES], State.RESETTING),
    ("reset_done", [State.RESETTING], State.IDLE),
    # Certificate renewal on a running cluster: back to running, or failed once something was changed.
    ("renew", [State.RUNNING], State.RENEWING),
    ("renewed", [State.RENEWING], State.RUNNING),
    ("fail", [State.RENEWING], State.FAILED),
    ("reset", [State.RENEWING], State.RESETTING),
    # Stop and start (docs/protocol.md "Stop and start"): a stopped node keeps everything but its processes; a
    # start re-enters the install at the kubelet, so images, binaries and kubeadm are never walked again. A stop
    # that could not end every process is a failure (an install then re-checks the whole node).
    ("stop", [State.RUNNING], State.STOPPED),
    ("start", [State.STOPPED], State.KUBELET),
    ("fail", [State.STOPPED], State.FAILED),
    ("reset", [State.STOPPED], State.RESETTING),
    # Upgrade in place: from running, step by step, back to running on the new version. A failure before the
    # control plane changed (or one kubeadm rolled back) returns to running on the old version ("abandon"), with
    # the error in the status; a failure after it is repaired once from the kubelet restart (`running` on the new
    # version with the error in the status), and only a failed repair is `failed` on the new version.
    ("upgrade", [State.RUNNING], UPGRADE_STATES[0]),
    *[("next", [a], b) for a, b in itertools.pairwise(UPGRADE_STATES)],
    ("next", [UPGRADE_STATES[-1]], State.RUNNING),
    ("abandon", list(UPGRADE_STATES[:UPGRADE_STATES.index(UPGRADE_LAST_UNCHANGED) + 1]), State.RUNNING),
    # A failure once the control plane changed is repaired once, on the new version: back to the kubelet restart.
    ("repair", [State.UPGRADE_READINESS], State.UPGRADE_KUBELET),
    ("fail", list(UPGRADE_STATES), State.FAILED),
    ("reset", list(UPGRADE_STATES), State.RESETTING),
]

# Which request interrupts the job running in which state. An install job also runs in idle and failed (before
# its first transition) and in running (the quiet re-check after a restart). Reset interrupts an install (it
# would undo its work anyway) and cancel stops it; nothing interrupts a reset, which must not leave a
# half-cleaned node. A reset also interrupts a renewal (it removes the certificates anyway); cancel does not, so
# that a renewal never stops between writing the files and restarting what uses them.
# A reset also interrupts a stop (it stops everything too); nothing else does, so that a stop is never left half
# done by a request (a start waits for it: `busy`).
_INSTALL_JOB_STATES = frozenset(INSTALL_STATES) | {State.IDLE, State.FAILED, State.RUNNING}
# A reset also interrupts an upgrade (it removes the cluster anyway); cancel does not: an upgrade stopped between
# `kubeadm upgrade apply` and the kubelet restart would leave a kubelet older than its control plane.
PREEMPTS: dict[Action, frozenset[State]] = {
    Action.RESET: _INSTALL_JOB_STATES | {State.RENEWING, State.STOPPED, *UPGRADE_STATES},
    Action.CANCEL: _INSTALL_JOB_STATES,
    Action.INSTALL: frozenset(),
    Action.STATUS: frozenset(),
    Action.RENEW_CERTS: frozenset(),
    Action.KUBECONFIG: frozenset(),
    Action.STOP: frozenset(),
    Action.START: frozenset(),
    Action.UPGRADE: frozenset(),
}


class IllegalTransitionError(Exception):
    """The engine tried a state change the graph does not allow (a bug, never bad input)."""


def _transition_table() -> list[dict[str, Any]]:
    table: list[dict[str, Any]] = []
    for trigger, sources, dest in _EDGES:
        entry: dict[str, Any] = {"trigger": trigger, "source": [s.value for s in sources], "dest": dest.value}
        if trigger in ("resume", "repair"):
            entry["conditions"] = "_is_target"  # one trigger, several destinations: the engine names the one
        table.append(entry)
    return table


class StateMachine:
    """The current state, changed only along declared edges."""

    def __init__(self, initial: State) -> None:
        self._target: str | None = None
        self.state: str = initial.value
        self._machine = Machine(
            model=self,
            states=[s.value for s in State],
            transitions=_transition_table(),
            initial=initial.value,
            auto_transitions=False,
            send_event=True,  # conditions see the transition they guard
        )
        self._triggers: dict[tuple[str, str], str] = {}
        for trigger, sources, dest in _EDGES:
            for source in sources:
                self._triggers[(source.value, dest.value)] = trigger

    @property
    def current(self) -> State:
        return State(self.state)

    def _is_target(self, event: Any) -> bool:
        return bool(event.transition.dest == self._target)

    def allows(self, dest: State) -> bool:
        return (self.state, dest.value) in self._triggers

    def move(self, dest: State) -> None:
        trigger = self._triggers.get((self.state, dest.value))
        if trigger is None:
            raise IllegalTransitionError(f"no transition {self.state} -> {dest.value}")
        self._target = dest.value
        try:
            fired = self.trigger(trigger)  # type: ignore[attr-defined]  # added by transitions
        except MachineError as exc:
            raise IllegalTransitionError(f"{self.state} -> {dest.value}: {exc.value}") from exc
        finally:
            self._target = None
        if not fired or self.state != dest.value:
            raise IllegalTransitionError(f"transition {trigger} did not reach {dest.value} (at {self.state})")


def mermaid() -> str:
    """The graph as a Mermaid state diagram (no graphviz needed)."""
    from transitions.extensions import GraphMachine

    class _Model:
        pass

    model = _Model()
    table = [{k: v for k, v in t.items() if k != "conditions"} for t in _transition_table()]
    GraphMachine(
        model=model,
        states=[s.value for s in State],
        transitions=table,
        initial=State.IDLE.value,
        auto_transitions=False,
        graph_engine="mermaid",
        title="lifecycle states",
    )
    text: str = model.get_graph().draw(None)  # type: ignore[attr-defined]
    return text
