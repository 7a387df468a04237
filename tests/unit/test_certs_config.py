"""The `[pki]` keys of certificate expiry and renewal: fractional lifetimes, warning thresholds, renewal lead,
check interval; each bad value refused with its key named; the kubeadm config carries the short lifetimes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lifecycle.config import ConfigError, PkiConfig, load_config
from lifecycle.kubefiles import go_duration, render_kubeadm_config
from lifecycle.step import ClusterParams

REPO = Path(__file__).resolve().parents[2]
BASE = (REPO / "simnode" / "lifecycle.toml").read_text()


def _with_pki(tmp_path: Path, lines: str) -> Path:
    text = BASE.replace('[pki]\nkey_algorithm = "ecdsa-p256"', f'[pki]\nkey_algorithm = "ecdsa-p256"\n{lines}')
    assert lines in text
    path = tmp_path / "lifecycle.toml"
    path.write_text(text.replace('"../deploy/addons"', f'"{REPO / "deploy" / "addons"}"'))
    return path


def test_defaults_and_the_shipped_vm_config() -> None:
    for name in ("simnode", "deploy"):
        pki = load_config(REPO / name / "lifecycle.toml").pki
        assert (pki.cert_validity_days, pki.ca_validity_days) == (365, 3650)
        assert pki.expiry_warning_days == (90, 30, 7) == PkiConfig().expiry_warning_days
        assert (pki.renew_before_days, pki.check_interval_s) == (30, 3600)


def test_short_lifetimes_for_tests_are_accepted_and_reach_the_kubeadm_config(tmp_path: Path) -> None:
    config = load_config(_with_pki(tmp_path, "\n".join([
        "cert_validity_days = 0.0025",  # 216 s
        "ca_validity_days = 1",
        "expiry_warning_days = [0.001, 0.002, 0.002, 1]",
        "renew_before_days = 0.0015",
        "check_interval_s = 0.5",
    ])))
    pki = config.pki
    assert pki.cert_validity_days == 0.0025 and pki.expiry_warning_days == (1.0, 0.002, 0.001)
    assert (pki.renew_before_days, pki.check_interval_s) == (0.0015, 0.5)
    docs = list(yaml.safe_load_all(render_kubeadm_config(
        config, ClusterParams("v1.31.4", api_port=6443, kubelet_healthz_port=10248), certificates_dir=tmp_path,
        cgroup_driver="systemd")))
    assert docs[1]["certificateValidityPeriod"] == "0h3m36s"
    assert docs[1]["caCertificateValidityPeriod"] == "24h0m0s"
    assert go_duration(365 * 86400) == "8760h0m0s"


@pytest.mark.parametrize(("lines", "key", "why"), [
    ("renew_before_days = 0.01\ncert_validity_days = 0.01", "pki.renew_before_days", "must be less than"),
    ("renew_before_days = -1", "pki.renew_before_days", ">= 0"),
    ("expiry_warning_days = [30, 0]", "pki.expiry_warning_days", "numbers > 0"),
    ('expiry_warning_days = ["30"]', "pki.expiry_warning_days", "numbers > 0"),
    ("expiry_warning_days = 30", "pki.expiry_warning_days", "a list"),
    ("check_interval_s = 0", "pki.check_interval_s", "> 0"),
    ("cert_validity_days = 0", "pki.cert_validity_days", "> 0"),
    ("renew_before = 3", "pki.renew_before", "unknown key"),
])
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, lines: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_with_pki(tmp_path, lines))
    assert str(err.value).startswith(f"{key}:") and why in str(err.value), err.value


def test_zero_disables_automatic_renewal(tmp_path: Path) -> None:
    assert load_config(_with_pki(tmp_path, "renew_before_days = 0")).pki.renew_before_days == 0
