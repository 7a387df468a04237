"""The hard-link scan of `docker save` output, in both layouts Docker Engine writes (classic `<id>/layer.tar`, and
OCI `blobs/sha256/<digest>` with JSON blobs beside the layers, gzipped or not)."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import tarfile

from lifecycle.imagescan import LayerLinks, hard_links, layer_links, resolve_dirs
from lifecycle.tarstream import ChunkPipe


def _tar(entries: list[tuple[str, bytes | None, str | None, bytes]]) -> bytes:
    """(name, data, linkname, type) entries; data None for links."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data, linkname, kind in entries:
            info = tarfile.TarInfo(name)
            if linkname is not None:
                info.type, info.linkname = kind, linkname
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return out.getvalue()


async def _scan(saved: bytes, paths: set[str]) -> dict[str, str]:
    pipe = ChunkPipe(asyncio.get_running_loop())
    scan = asyncio.create_task(asyncio.to_thread(hard_links, pipe, paths))
    for start in range(0, len(saved), 4096):
        await pipe.put(saved[start:start + 4096])
    await pipe.close()
    return await scan


async def test_hard_links_are_found_in_classic_and_oci_layouts() -> None:
    base = _tar([("usr/bin/kubeadm", b"ok", None, tarfile.REGTYPE), ("bin", None, "usr/bin", tarfile.SYMTYPE),
                 ("etc/secret", b"s", None, tarfile.REGTYPE)])
    top = _tar([("./usr/bin/kubelet", None, "etc/secret", tarfile.LNKTYPE)])
    classic = _tar([("a/layer.tar", base, None, tarfile.REGTYPE), ("b/json", b"{}", None, tarfile.REGTYPE),
                    ("b/layer.tar", top, None, tarfile.REGTYPE),
                    ("manifest.json", json.dumps([{"Layers": ["a/layer.tar", "b/layer.tar"]}]).encode(), None,
                     tarfile.REGTYPE)])
    oci = _tar([("blobs/sha256/aa", base, None, tarfile.REGTYPE), ("blobs/sha256/bb", b'{"config": 1}', None,
                                                                    tarfile.REGTYPE),
                ("blobs/sha256/cc", gzip.compress(top), None, tarfile.REGTYPE),
                ("index.json", b"{}", None, tarfile.REGTYPE), ("oci-layout", b"{}", None, tarfile.REGTYPE)])
    wanted = {"/usr/bin/kubeadm", "/usr/bin/kubelet", "/bin/kubelet"}
    for saved in (classic, oci):
        assert await _scan(saved, wanted) == {"/usr/bin/kubelet": "/etc/secret", "/bin/kubelet": "/etc/secret"}


async def test_xattrs_and_dotdot_names_are_found_as_the_layers_hold_them() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        kubelet = tarfile.TarInfo("usr/bin/kubelet")
        kubelet.pax_headers = {"SCHILY.xattr.user.hostile": "1", "SCHILY.xattr.security.capability": "x"}
        tar.addfile(kubelet, io.BytesIO(b""))
        tar.addfile(tarfile.TarInfo("usr/bin/../../../etc/x"), io.BytesIO(b""))
        tar.addfile(tarfile.TarInfo("bin"), None)
    saved = _tar([("a/layer.tar", out.getvalue(), None, tarfile.REGTYPE)])
    pipe = ChunkPipe(asyncio.get_running_loop())
    scan = asyncio.create_task(asyncio.to_thread(layer_links, pipe))
    await pipe.put(saved)
    await pipe.close()
    layers: LayerLinks = await scan
    assert layers.extended_attributes({"/usr/bin/kubelet", "/usr/bin/kubectl"}) == {
        "/usr/bin/kubelet": ("security.capability", "user.hostile")}
    assert layers.dotdot_names == ("usr/bin/../../../etc/x",)


def test_directories_resolve_through_symlinks_inside_the_image() -> None:
    links = {"/bin": "usr/bin", "/usr/local": "/opt/x", "/up": "../../etc", "/l1": "l2", "/l2": "l1"}
    assert resolve_dirs("/bin/kubectl", links) == "/usr/bin/kubectl"
    assert resolve_dirs("/usr/local/bin/crictl", links) == "/opt/x/bin/crictl"
    assert resolve_dirs("/up/secret", links) == "/etc/secret"  # `..` stops at the image's root
    assert resolve_dirs("/bin", links) == "/bin"  # the last component is the file itself, not followed
    resolve_dirs("/l1/x", links)  # a loop ends
