"""The kube-apiserver stand-in authorises service accounts with RBAC, driven by the real kubectl: tokens from
`kubectl create token` (TokenRequest), `kubectl --as`, Roles/ClusterRoles and their bindings, verbs,
resources and subresources, resourceNames, wildcards, namespaced vs cluster scope, and the 403 message the
real server sends. Client certificates of system:masters stay all-powerful."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_apiserver_support import FAST_FAULTS, ApiServer, launch, make_pki, openssl

SA = "system:serviceaccount:rbac:robot"


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    root = tmp_path_factory.mktemp("node")
    # kubeadm's service-account key pair, where its manifest points (RSA here; the EC case is covered below).
    dest = root / "etc/kubernetes/pki"
    dest.mkdir(parents=True)
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=dest)
    openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=dest)
    server = launch(root, pki, faults=FAST_FAULTS, extra=(
        "--service-account-signing-key-file=/etc/kubernetes/pki/sa.key",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local"))
    k = server.kubectl
    k("create", "namespace", "rbac")
    k("create", "namespace", "other")
    k("-n", "rbac", "create", "serviceaccount", "robot")
    for ns in ("rbac", "other"):
        k("-n", ns, "create", "configmap", "open", "--from-literal=a=1")
        k("-n", ns, "create", "configmap", "secret-ish", "--from-literal=a=2")
    yield server
    assert server.stop() == 0, server.log.read_text()


def token_kubeconfig(server: ApiServer, token: str, path: Path) -> Path:
    cfg = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "sim", "cluster": {"server": server.url,
                                                 "certificate-authority": str(server.pki.path("ca.crt"))}}],
        "users": [{"name": "robot", "user": {"token": token}}],
        "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": "robot", "namespace": "rbac"}}],
        "current-context": "sim",
    }
    path.write_text(json.dumps(cfg))
    return path


def apply(server: ApiServer, tmp_path: Path, text: str) -> None:
    path = tmp_path / "objects.yaml"
    path.write_text(textwrap.dedent(text))
    server.kubectl("apply", "-f", str(path))


def forbidden_line(server: ApiServer, *args: str, kubeconfig: Path | None = None) -> str:
    res = server.kubectl(*args, check=False, kubeconfig=kubeconfig)
    assert res.returncode != 0, f"{args} was allowed:\n{res.stdout}"
    return res.stderr.strip()


def test_a_token_from_kubectl_create_token_is_forbidden_outside_its_bindings_and_allowed_inside(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    token = apiserver.kubectl("-n", "rbac", "create", "token", "robot").stdout.strip()
    assert token.count(".") == 2
    robot = token_kubeconfig(apiserver, token, tmp_path / "robot.kubeconfig")

    line = forbidden_line(apiserver, "get", "configmaps", kubeconfig=robot)
    assert line == ('Error from server (Forbidden): configmaps is forbidden: User "system:serviceaccount:rbac:robot" '
                    'cannot list resource "configmaps" in API group "" in the namespace "rbac"')
    apply(apiserver, tmp_path, """\
        apiVersion: rbac.authorization.k8s.io/v1
        kind: Role
        metadata: {name: cm-reader, namespace: rbac}
        rules:
        - apiGroups: [""]
          resources: ["configmaps"]
          verbs: ["get", "list"]
        ---
        apiVersion: rbac.authorization.k8s.io/v1
        kind: RoleBinding
        metadata: {name: robot-reads, namespace: rbac}
        roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: cm-reader}
        subjects:
        - {kind: ServiceAccount, name: robot, namespace: rbac}
        """)
    names = apiserver.kubectl("get", "configmaps", "-o", "name", kubeconfig=robot).stdout.split()
    assert "configmap/open" in names
    # The Role grants get/list in its namespace only: not delete, not another namespace, not cluster scope.
    assert forbidden_line(apiserver, "delete", "configmap", "open", kubeconfig=robot).endswith(
        'configmaps "open" is forbidden: User "system:serviceaccount:rbac:robot" cannot delete resource '
        '"configmaps" in API group "" in the namespace "rbac"')
    assert 'in the namespace "other"' in forbidden_line(apiserver, "-n", "other", "get", "cm", kubeconfig=robot)
    assert forbidden_line(apiserver, "get", "storageclasses", kubeconfig=robot).endswith(
        'storageclasses.storage.k8s.io is forbidden: User "system:serviceaccount:rbac:robot" cannot list resource '
        '"storageclasses" in API group "storage.k8s.io" at the cluster scope')


def test_impersonated_service_account_gets_the_same_answers(apiserver: ApiServer, tmp_path: Path) -> None:
    k = apiserver.kubectl
    line = forbidden_line(apiserver, f"--as={SA}", "-n", "rbac", "get", "secrets")
    assert line.endswith(f'secrets is forbidden: User "{SA}" cannot list resource "secrets" in API group "" '
                         'in the namespace "rbac"')
    apply(apiserver, tmp_path, """\
        apiVersion: rbac.authorization.k8s.io/v1
        kind: ClusterRole
        metadata: {name: robot-cluster}
        rules:
        - apiGroups: ["*"]
          resources: ["storageclasses"]
          verbs: ["*"]
        - apiGroups: [""]
          resources: ["configmaps"]
          resourceNames: ["open"]
          verbs: ["get"]
        - apiGroups: [""]
          resources: ["*/status"]
          verbs: ["get"]
        ---
        apiVersion: rbac.authorization.k8s.io/v1
        kind: ClusterRoleBinding
        metadata: {name: robot-cluster}
        roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: robot-cluster}
        subjects:
        - {kind: ServiceAccount, name: robot, namespace: rbac}
        """)
    assert k(f"--as={SA}", "get", "storageclasses").returncode == 0  # apiGroups "*" and verbs "*"
    # kubectl auth can-i asks a SelfSubjectAccessReview, answered by the same rules.
    assert k(f"--as={SA}", "auth", "can-i", "delete", "storageclasses").stdout.strip() == "yes"
    denied = k(f"--as={SA}", "auth", "can-i", "delete", "nodes", check=False)
    assert (denied.returncode, denied.stdout.strip()) == (1, "no")
    assert k(f"--as={SA}", "-n", "other", "get", "configmap", "open").returncode == 0  # resourceNames, any ns
    assert "cannot get resource" in forbidden_line(apiserver, f"--as={SA}", "-n", "other", "get", "cm", "secret-ish")
    assert k(f"--as={SA}", "get", "--raw", "/api/v1/namespaces/other/status").returncode == 0  # */status
    assert 'cannot get resource "namespaces"' in forbidden_line(apiserver, f"--as={SA}", "get", "ns", "other")
    # A binding whose role does not exist: the reason names it, as rbac.go reports visitor errors.
    apply(apiserver, tmp_path, """\
        apiVersion: rbac.authorization.k8s.io/v1
        kind: RoleBinding
        metadata: {name: dangling, namespace: other}
        roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: nowhere}
        subjects:
        - {kind: ServiceAccount, name: robot, namespace: rbac}
        """)
    assert forbidden_line(apiserver, f"--as={SA}", "-n", "other", "get", "pods").endswith(
        'in the namespace "other": RBAC: role.rbac.authorization.k8s.io "nowhere" not found')


def test_system_masters_certificate_is_not_restricted(apiserver: ApiServer) -> None:
    assert apiserver.kubectl("-n", "other", "get", "secrets").returncode == 0
    assert apiserver.kubectl("get", "clusterroles", "system:discovery", "-o", "name").stdout.strip() == \
        "clusterrole.rbac.authorization.k8s.io/system:discovery"


def test_bad_tokens_are_unauthorized(apiserver: ApiServer, tmp_path: Path) -> None:
    k = apiserver.kubectl
    k("-n", "rbac", "create", "serviceaccount", "short-lived")
    token = k("-n", "rbac", "create", "token", "short-lived").stdout.strip()
    head, claims, sig = token.split(".")
    tampered = token_kubeconfig(apiserver, f"{head}.{claims}.{sig[:-4]}AAAA", tmp_path / "tampered")
    res = k("get", "--raw", "/api", kubeconfig=tampered, check=False)
    assert res.returncode != 0 and "Unauthorized" in res.stderr
    valid = token_kubeconfig(apiserver, token, tmp_path / "valid")
    assert k("get", "--raw", "/api", kubeconfig=valid).returncode == 0  # system:discovery for authenticated
    k("-n", "rbac", "delete", "serviceaccount", "short-lived")
    res = k("get", "--raw", "/api", kubeconfig=valid, check=False)  # the account is gone: so is the token
    assert res.returncode != 0 and "Unauthorized" in res.stderr
    res = k("-n", "rbac", "create", "token", "robot", "--duration=5m", check=False)
    assert res.returncode != 0 and "may not specify a duration less than 10 minutes" in res.stderr
