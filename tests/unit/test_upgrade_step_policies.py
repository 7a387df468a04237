"""`[steps.upgrade_*]` tables override the upgrade steps' own deadlines and retries, starting from the same values."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.config import UPGRADE_STEP_POLICIES, ConfigError, StepPolicy, load_config
from states.upgrade_apply import UpgradeApply
from states.upgrade_binaries import UpgradeBinaries
from states.upgrade_images import UpgradeImages
from states.upgrade_kubelet import UpgradeKubelet
from states.upgrade_plan import UpgradePlan
from states.upgrade_readiness import UpgradeReadiness

SIM_CONFIG = Path(__file__).resolve().parents[2] / "simnode" / "lifecycle.toml"


def test_the_config_base_of_each_upgrade_step_is_the_steps_own_default() -> None:
    for step in (UpgradeImages(), UpgradeBinaries(), UpgradePlan(), UpgradeApply(), UpgradeKubelet(),
                 UpgradeReadiness()):
        assert UPGRADE_STEP_POLICIES[step.name] == StepPolicy(timeout_s=step.timeout_s, retries=step.retries)


def test_an_upgrade_step_table_overrides_what_it_names(tmp_path: Path) -> None:
    path = tmp_path / "lifecycle.toml"
    path.write_text(SIM_CONFIG.read_text() + "\n[steps.upgrade_kubelet]\ntimeout_s = 8\n")
    policy = load_config(path).steps["upgrade_kubelet"]
    assert (policy.timeout_s, policy.retries) == (8, UpgradeKubelet.retries)
    path.write_text(SIM_CONFIG.read_text() + "\n[steps.upgrade_nothing]\ntimeout_s = 8\n")
    with pytest.raises(ConfigError, match="upgrade_nothing: unknown step"):
        load_config(path)
