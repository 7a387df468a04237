"""A checked PKI bundle put in place for an install: identical to the PKI on disk, it is accepted in any state and
writes nothing; otherwise it replaces the PKI only while no cluster runs on it, all-or-nothing (staged next to
it, fsynced, swapped in with one rename). Leaves exactly the bundle's files in `<root>/etc/kubernetes/pki`
(keys 0600, certificates 0644); the certs state then issues the missing leaves and kubeconfigs from its CAs.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from lifecycle.config import Config
from lifecycle.errors import RequestError
from lifecycle.machine import INSTALL_STATES, State
from lifecycle.nodeaddr import NodeAddressError, node_ip_for_install
from lifecycle.paths import HostPaths
from lifecycle.pki import CERT_MODE, KEY_MODE
from lifecycle.pki_bundle import PkiBundle, load_bundle
from lifecycle.pki_specs import PkiParams
from lifecycle.pki_x509 import load_cert, load_key, same_cert
from lifecycle.step import finish_in_thread

STAGING_PREFIX = ".pki-bundle-"  # temp dirs next to the PKI dir (same filesystem: the swap is a rename)
DIR_MODE = 0o755
KUBEADM_STEP = INSTALL_STATES.index(State.KUBEADM) + 1  # a failure before this step left no cluster behind
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100

PrepareFn = Callable[[State, int | None], Coroutine[Any, Any, None]]  # engine.InstallPrepare


# ---- comparing --------------------------------------------------------------------------------------------


def _same_file(name: str, new: bytes, old: bytes) -> bool:
    """Same certificate or key, whatever the PEM flavour or line endings."""
    if name.endswith(".crt"):
        return same_cert(load_cert(new), load_cert(old))
    if name.endswith(".key"):
        der = (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return load_key(new).private_bytes(*der) == load_key(old).private_bytes(*der)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return (serialization.load_pem_public_key(new).public_bytes(*spki)
            == serialization.load_pem_public_key(old).public_bytes(*spki))


def same_as_disk(bundle: PkiBundle, pki_dir: Path) -> bool:
    """Every file of the bundle is on disk with the same content (files the bundle lacks do not matter)."""
    for name, data in bundle.files.items():
        try:
            if not _same_file(name, data, (pki_dir / name).read_bytes()):
                return False
        except (OSError, ValueError):
            return False
    return True


def cluster_on_pki(state: State, step: int | None, paths: HostPaths) -> str | None:
    """Why the PKI in place must not be replaced (a cluster runs on it, or may: "kubeadm has run on it"), or None."""
    if state not in (State.IDLE, State.FAILED):
        return f"a cluster runs on it (state {state})"
    if state == State.FAILED and (step is None or step >= KUBEADM_STEP):
        where = f"the install failed in step {step}" if step is not None else "a reset or a renewal failed"
        return f"a cluster may run on it ({where})"
    made_by_kubeadm = [paths.kubelet_config, *sorted(paths.manifests_dir.glob("*.yaml"))]
    for path in made_by_kubeadm:
        if path.exists():
            return f"kubeadm has run on it ({path.relative_to(paths.root)} exists)"
    return None


# ---- writing ----------------------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(mode=DIR_MODE, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # the key's mode from the first byte on
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories in one step (renameat2 RENAME_EXCHANGE); OSError when the system cannot."""
    renameat2: Any = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(b))


def _swap_in(staged: Path, target: Path) -> None:
    """Put `staged` at `target`; the old `target` (if any) ends up at `staged`."""
    if not target.exists():
        staged.rename(target)
        return
    try:
        _exchange(staged, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise
        # No atomic exchange here: two renames; a crash between them leaves no PKI, which the certs state
        # would then make anew (and this bundle is simply sent again).
        aside = target.with_name(f"{STAGING_PREFIX}old-{os.getpid()}")
        target.rename(aside)
        staged.rename(target)
        aside.rename(staged)


def write_bundle(bundle: PkiBundle, pki_dir: Path) -> None:
    """Replace `pki_dir` with exactly the bundle's files, all or nothing."""
    parent = pki_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    for leftover in parent.glob(STAGING_PREFIX + "*"):  # from a crash during an earlier write
        shutil.rmtree(leftover, ignore_errors=True)
    staged = Path(tempfile.mkdtemp(dir=parent, prefix=STAGING_PREFIX))
    try:
        staged.chmod(DIR_MODE)
        for name, data in sorted(bundle.files.items()):
            _write_new(staged / name, data, KEY_MODE if name.endswith(".key") else CERT_MODE)
        for directory in {(staged / name).parent for name in bundle.files}:
            _fsync_dir(directory)
        _swap_in(staged, pki_dir)
        _fsync_dir(parent)  # the swap survives a crash
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # the old PKI after a swap; the partial one after a failure


# ---- the install hook -------------------------------------------------------------------------------------


async def bundle_prepare(raw: dict[str, Any], *, config: Config, paths: HostPaths, log: Any) -> PrepareFn:
    """Check the request's `pki` now (BundleError, a RequestError, when it is unfit: nothing is written) and
    return what the engine runs under its lock, after its own checks, before it accepts the install."""
    try:
        node_ip = await asyncio.to_thread(node_ip_for_install, config.kubernetes.node_ip, paths.root)
    except NodeAddressError as exc:
        raise RequestError(exc.code, exc.message) from exc
    params = PkiParams.from_config(config, api_port=config.kubernetes.api_port, node_ip=node_ip)
    bundle = await asyncio.to_thread(load_bundle, raw, params, now=datetime.now(UTC))

    async def prepare(state: State, step: int | None) -> None:
        if await asyncio.to_thread(same_as_disk, bundle, paths.pki_dir):
            log.info("pki bundle is the PKI in place", files=len(bundle.files), state=state.value)
            return
        why = await asyncio.to_thread(cluster_on_pki, state, step, paths)
        if why is not None:
            raise RequestError("reset_required", f"the bundle is not the PKI in place, and {why}: reset first")
        await finish_in_thread(write_bundle, bundle, paths.pki_dir)
        log.info("pki bundle written", files=bundle.names(), pki_dir=str(paths.pki_dir))

    return prepare

