"""Errors the kubeadm stand-in reports: each carries the exit code and the text kubeadm would print."""

from __future__ import annotations


class KubeadmError(Exception):
    """A failure that ends the command with `exit_code` after printing `str(self)` on stderr."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PhaseError(KubeadmError):
    """A phase failed: printed as `error execution phase <phase>: <message>` like kubeadm."""

    def __init__(self, phase: str, message: str, *, exit_code: int = 1) -> None:
        super().__init__(f"error execution phase {phase}: {message}", exit_code=exit_code)
        self.phase = phase
        self.reason = message


class ConfigError(KubeadmError):
    """The configuration cannot be used; `problems` lists every cause found (all are printed)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
