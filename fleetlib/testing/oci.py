"""Container images for tests, written as the tools write them: an OCI image layout
(`oci-layout`, `index.json`, `blobs/sha256/...`), a tar of one, and a `docker save`
tarball; plus a three-layer sample image and the directory it should unpack to.

The sample's layers: (1) a `make_tree` root and a few more files, GNU tar, gzip;
(2) a replaced file, a replaced hard link, whiteouts of a file and of a directory, an
opaque directory and a hard link pair of its own, GNU tar, zstd; (3) a hard link to a
file of layer 1, a whiteout of a layer-1 file, and an entry whose parents only lower
layers hold, Python's tarfile, uncompressed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import zstandard

from fleetlib.testing.trees import make_tree

LAYER_TYPES = {"plain": "application/vnd.oci.image.layer.v1.tar",
               "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
SAMPLE_COMPRESSIONS = ("gzip", "zstd", "plain")


def digest_of(data: bytes) -> str:
    """`sha256:<hex>` of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, how: str) -> bytes:
    """`data` as a layer blob: "plain", "gzip" or "zstd"."""
    if how == "gzip":
        return gzip.compress(data, compresslevel=1)
    if how == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)
    return data


def gnu_tar_layer(directory: Path) -> bytes:
    """An uncompressed layer of `directory` as image builders make one (pax, xattrs,
    numeric owners, hard links)."""
    return subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--format=posix",
         "-cpf", "-", "-C", str(directory), "."], check=True, capture_output=True).stdout


def python_tar_layer(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    """An uncompressed layer of hand-made members (content for regular ones)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def put_blob(layout: Path, data: bytes, media_type: str) -> dict[str, Any]:
    """Store `data` under blobs/sha256/ and return its descriptor."""
    digest = digest_of(data)
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def config_json(layers: list[bytes]) -> bytes:
    """An image config whose rootfs.diff_ids name the uncompressed `layers`."""
    return json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                       "rootfs": {"type": "layers",
                                  "diff_ids": [digest_of(layer) for layer in layers]}}).encode()


def write_manifest(layout: Path, manifest: dict[str, Any],
                   platform: dict[str, str] | None = None) -> dict[str, Any]:
    """Store `manifest`, make `index.json` name it alone, and return its descriptor."""
    descriptor = put_blob(layout, json.dumps(manifest).encode(), MANIFEST_TYPE)
    if platform is not None:
        descriptor["platform"] = platform
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                   "manifests": [descriptor]}))
    return descriptor


def image_manifest(layout: Path, layers: list[bytes],
                   compressions: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """A manifest of `layers` (uncompressed tars) stored compressed as asked, with
    their config; every blob is written to `layout`."""
    return {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": put_blob(layout, config_json(layers), CONFIG_TYPE),
            "layers": [put_blob(layout, compress(layer, how), LAYER_TYPES[how])
                       for layer, how in zip(layers, compressions, strict=True)]}


def write_layout(layout: Path, layers: list[bytes],
                 compressions: tuple[str, ...] | list[str]) -> Path:
    """An OCI image layout of `layers` (uncompressed tars), compressed as asked."""
    write_manifest(layout, image_manifest(layout, layers, compressions))
    return layout


def write_docker_save(path: Path, layers: list[bytes]) -> Path:
    """A `docker save` tarball (legacy layout: `<id>/layer.tar`, `<hex>.json` config)
    of `layers` (uncompressed tars)."""
    config = config_json(layers)
    config_name = digest_of(config).removeprefix("sha256:") + ".json"
    names = [f"{hashlib.sha256(str(i).encode()).hexdigest()}/layer.tar"
             for i in range(len(layers))]
    manifest = [{"Config": config_name, "RepoTags": ["sample:latest"], "Layers": names}]
    with tarfile.open(path, "w") as tar:
        for name, data in [(config_name, config), *zip(names, layers, strict=True),
                           ("manifest.json", json.dumps(manifest).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tar_directory(directory: Path, path: Path) -> Path:
    """An uncompressed tar of `directory`'s contents (an OCI layout as one file)."""
    subprocess.run(["tar", "-cf", str(path), "-C", str(directory), "."], check=True)
    return path


def sample_image(work: Path) -> tuple[list[bytes], Path]:
    """The three uncompressed layers of the sample image (to be compressed as
    SAMPLE_COMPRESSIONS) and the directory they make: `work/expected`."""
    lower = make_tree(work / "layer1")
    (lower / "opt" / "old" / "deep").mkdir(parents=True)
    (lower / "opt" / "old" / "deep" / "a").write_bytes(b"gone with opt/old")
    (lower / "opt" / "kept").write_bytes(b"kept")
    (lower / "srv" / "data" / "sub").mkdir(parents=True)
    (lower / "srv" / "data" / "old").write_bytes(b"hidden by the opaque directory")
    (lower / "srv" / "data" / "sub" / "x").write_bytes(b"hidden too")
    (lower / "etc" / "motd").write_bytes(b"deleted by layer 3")
    expected = work / "expected"
    subprocess.run(["cp", "-a", str(lower), str(expected)], check=True)

    upper = work / "layer2"
    for folder in ("etc/ssl", "opt", "srv/data", "usr/bin", "usr/lib"):
        (upper / folder).mkdir(parents=True)
    (upper / "etc" / "hostname").write_text("replaced\n")
    (upper / "etc" / "hostname").chmod(0o600)
    (upper / "usr" / "bin" / "passwd").write_bytes(b"\x7fELF new passwd")
    (upper / "usr" / "bin" / "passwd").chmod(0o4755)  # chfn keeps the old inode
    (upper / "etc" / "ssl" / ".wh.cert.pem").write_bytes(b"")
    (upper / "opt" / ".wh.old").write_bytes(b"")
    (upper / "srv" / "data" / ".wh..wh..opq").write_bytes(b"")
    (upper / "srv" / "data" / "new").write_bytes(b"the opaque directory's only file")
    (upper / "srv" / "data").chmod(0o700)
    (upper / "usr" / "lib" / "one").write_bytes(b"a pair of links in layer 2")
    os.link(upper / "usr" / "lib" / "one", upper / "usr" / "lib" / "two")
    (expected / "etc" / "ssl" / "cert.pem").unlink()
    shutil.rmtree(expected / "opt" / "old")
    shutil.rmtree(expected / "srv" / "data")
    subprocess.run(["rsync", "-aHAX", "--numeric-ids", "--exclude=.wh.*", f"{upper}/",
                    f"{expected}/"], check=True)  # a new inode per file, as a copy-up

    link = tarfile.TarInfo("usr/bin/chfn-again")
    link.type, link.linkname = tarfile.LNKTYPE, "usr/bin/chfn"
    added = tarfile.TarInfo("var/lib/added")
    added.mode, added.uid, added.gid, added.mtime = 0o640, 42, 43, 1_700_000_000
    layers = [gnu_tar_layer(lower), gnu_tar_layer(upper),
              python_tar_layer((link, b""), (tarfile.TarInfo("etc/.wh.motd"), b""),
                               (added, b"parents from lower layers"))]
    os.link(expected / "usr" / "bin" / "chfn", expected / "usr" / "bin" / "chfn-again")
    (expected / "etc" / "motd").unlink()
    (expected / "var" / "lib" / "added").write_bytes(b"parents from lower layers")
    os.chown(expected / "var" / "lib" / "added", 42, 43)
    (expected / "var" / "lib" / "added").chmod(0o640)
    os.utime(expected / "var" / "lib" / "added", (1_700_000_000, 1_700_000_000))
    return layers, expected
