"""`lifecycle kubeconfig --merge`: the merge as a pure function and into files in a tmp dir; `kubectl` (the
independent client) reads what was written."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml
from kubeconfigs import kubeconfig, kubectl_view, names, two_contexts

from lifecycle.kubemerge import BACKUP_SUFFIX, KubeconfigMergeError, default_target, merge_into_file, merge_kubeconfig

FETCHED = yaml.safe_dump(kubeconfig("docker-desktop", server="https://kubernetes.docker.internal:6443"))


def test_merge_adds_the_entries_and_keeps_every_other_one_and_setting() -> None:
    result = merge_kubeconfig(yaml.safe_dump(two_contexts(), sort_keys=False), FETCHED, use=False)
    doc = yaml.safe_load(result.text)
    for section in ("clusters", "users", "contexts"):
        assert names(doc, section) == ["prod", "kind-dev", "docker-desktop"]
    assert doc["current-context"] == "prod" and not result.switched  # no --use: the user's choice stays
    assert doc["preferences"] == {"colors": True} and doc["x-unknown"] == [1, 2]
    assert doc["extensions"] == [{"name": "x", "extension": {"k": "v"}}]
    assert result.replaced == ()
    assert list(doc)[:4] == ["apiVersion", "kind", "clusters", "users"]  # the file's own order


def test_merge_replaces_our_entries_in_place_and_switches_only_with_use() -> None:
    existing = two_contexts()
    stale = kubeconfig("docker-desktop", server="https://old:6443")
    existing["clusters"].insert(0, stale["clusters"][0])
    existing["users"].insert(0, stale["users"][0])
    result = merge_kubeconfig(yaml.safe_dump(existing), FETCHED, use=True)
    doc = yaml.safe_load(result.text)
    assert names(doc, "clusters") == ["docker-desktop", "prod", "kind-dev"]
    assert doc["clusters"][0]["cluster"]["server"] == "https://kubernetes.docker.internal:6443"
    assert result.replaced == ("cluster docker-desktop", "user docker-desktop")
    assert doc["current-context"] == "docker-desktop" and result.switched


@pytest.mark.parametrize("existing", ["", "\n", "# nothing yet\n", "apiVersion: v1\nkind: Config\nclusters: null\n"])
def test_an_empty_file_or_one_without_current_context_gets_ours_as_current(existing: str) -> None:
    doc = yaml.safe_load(merge_kubeconfig(existing, FETCHED, use=False).text)
    assert doc["current-context"] == "docker-desktop"
    assert (doc["apiVersion"], doc["kind"]) == ("v1", "Config")


GARBAGE = {
    "binary": b"\x00\x01\xff\xfe garbage",
    "not yaml": b"clusters: [unclosed\n  - {",
    "a list": b"- a\n- b\n",
    "a string": b"just some words\n",
    "wrong kind": b"apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n",
    "wrong apiVersion": b"apiVersion: v2\nkind: Config\n",
    "clusters not a list": b"apiVersion: v1\nkind: Config\nclusters: {a: 1}\n",
    "entry without name": b"apiVersion: v1\nkind: Config\nusers:\n- user: {token: t}\n",
    "entry not a mapping": b"apiVersion: v1\nkind: Config\ncontexts:\n- ctx\n",
    "duplicate names": b"clusters:\n- name: a\n  cluster: {}\n- name: a\n  cluster: {}\n",
    "body not a mapping": b"clusters:\n- name: a\n  cluster: 7\n",
    "current-context not a string": b"current-context: [a]\n",
}


@pytest.mark.parametrize("content", GARBAGE.values(), ids=GARBAGE.keys())
def test_a_file_that_is_not_a_kubeconfig_is_refused_and_left_byte_for_byte(tmp_path: Path, content: bytes) -> None:
    target = tmp_path / "config"
    target.write_bytes(content)
    target.chmod(0o644)
    with pytest.raises(KubeconfigMergeError, match=r"not a kubeconfig|not YAML"):
        merge_into_file(target, FETCHED, use=True)
    assert target.read_bytes() == content and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config"]  # no backup, no temp file, no lock left


def test_a_fetched_config_without_its_context_is_refused(tmp_path: Path) -> None:
    broken = kubeconfig("docker-desktop", server="https://x:6443")
    broken["contexts"] = []
    target = tmp_path / "config"
    with pytest.raises(KubeconfigMergeError, match="no contexts entry named 'docker-desktop'"):
        merge_into_file(target, yaml.safe_dump(broken), use=False)
    assert not target.exists()


def test_merge_into_a_file_keeps_a_backup_writes_0600_and_kubectl_reads_all_three_contexts(tmp_path: Path) -> None:
    target = tmp_path / "config"
    original = yaml.safe_dump(two_contexts()).encode()
    target.write_bytes(original)
    target.chmod(0o644)
    result = merge_into_file(target, FETCHED, use=False)
    assert result.backup == tmp_path / f"config{BACKUP_SUFFIX}"
    assert result.backup.read_bytes() == original
    for path in (target, result.backup):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config", f"config{BACKUP_SUFFIX}"]
    view = kubectl_view(target)
    assert names(view, "contexts") == ["docker-desktop", "kind-dev", "prod"]  # kubectl sorts them
    assert view["current-context"] == "prod"
    ours = kubectl_view(target, "--context", "docker-desktop", "--minify")
    assert ours["clusters"][0]["cluster"]["server"] == "https://kubernetes.docker.internal:6443"


def test_a_missing_file_is_created_with_its_directory_0700(tmp_path: Path) -> None:
    target = tmp_path / "home" / ".kube" / "config"
    result = merge_into_file(target, FETCHED, use=False)
    assert result.backup is None and result.switched
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert kubectl_view(target)["current-context"] == "docker-desktop"


def test_a_lock_held_by_another_writer_refuses_and_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "config"
    target.write_bytes(b"")
    (tmp_path / "config.lock").write_bytes(b"")
    with pytest.raises(KubeconfigMergeError, match=r"config\.lock exists"):
        merge_into_file(target, FETCHED, use=False)
    assert target.read_bytes() == b"" and (tmp_path / "config.lock").exists()


def test_a_symlinked_config_is_merged_into_its_target_and_stays_a_link(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "kubeconfig"
    real.parent.mkdir()
    real.write_text(yaml.safe_dump(two_contexts()))
    link = tmp_path / "config"
    link.symlink_to(real)
    merge_into_file(link, FETCHED, use=False)
    assert link.is_symlink() and "docker-desktop" in names(yaml.safe_load(real.read_text()), "contexts")


def test_the_default_target_is_kubectls(tmp_path: Path) -> None:
    home, present = tmp_path / "home", tmp_path / "b"
    present.write_text("")
    assert default_target({}, home=home) == home / ".kube" / "config"
    assert default_target({"KUBECONFIG": f"{tmp_path / 'a'}:{present}"}, home=home) == present
    assert default_target({"KUBECONFIG": f":{tmp_path / 'a'}:{tmp_path / 'c'}"}, home=home) == tmp_path / "a"
