"""lifecycle.yamlsafe reads YAML with libyaml where PyYAML has it, with `yaml.safe_load`'s types and errors."""

from __future__ import annotations

import pytest
import yaml

from lifecycle import yamlsafe

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- cluster:
    certificate-authority-data: LS0tLS1CRUdJTg==
    server: https://127.0.0.1:6443
  name: kubernetes
users:
- name: admin
  user: {client-certificate-data: QUJD, client-key-data: REVG}
current-context: admin@kubernetes
port: 6443
enabled: yes
ratio: 0.5
nothing: ~
"""


def test_libyaml_reads_when_pyyaml_was_built_with_it() -> None:
    assert yaml.__with_libyaml__, "the venv's PyYAML has no libyaml: the service would parse in pure Python"
    assert yamlsafe._LOADER is yaml.CSafeLoader


def test_the_documents_are_those_of_safe_load() -> None:
    assert yamlsafe.load(KUBECONFIG) == yaml.safe_load(KUBECONFIG)
    assert yamlsafe.load(KUBECONFIG.encode()) == yaml.safe_load(KUBECONFIG)
    two = KUBECONFIG + "---\nkind: Second\n---\n"
    assert list(yamlsafe.load_all(two)) == list(yaml.safe_load_all(two))


@pytest.mark.parametrize("text", [
    "a: !!python/object/apply:os.system ['true']",
    "a: !!python/name:os.system",
    "a: [unclosed",
])
def test_what_safe_load_refuses_is_refused_with_a_yaml_error(text: str) -> None:
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(text)
    with pytest.raises(yaml.YAMLError):
        yamlsafe.load(text)
