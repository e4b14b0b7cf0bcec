"""Tests of fstree.oci through OciSource: a three-layer image (gzip, zstd and plain
layers; replaced files, whiteouts, an opaque directory, hard links within and across
layers) as an OCI layout, a tar of one and a `docker save` tarball gives exactly the
tree of the directory it should unpack to; every kind of bad image is refused in one
line."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleetlib.errors import FleetError
from fleetlib.fstree.oci import host_platform
from fleetlib.fstree.scan import scan_directory
from fleetlib.fstree.source import OciSource
from fleetlib.fstree.tree import Tree
from fleetlib.testing.oci import (
    LAYER_TYPES,
    SAMPLE_COMPRESSIONS,
    gnu_tar_layer,
    image_manifest,
    put_blob,
    python_tar_layer,
    sample_image,
    tar_directory,
    write_docker_save,
    write_layout,
    write_manifest,
)

HERE = host_platform().split("/")[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[bytes], Path]:
    """The sample image's layers and the directory they make."""
    if os.geteuid() != 0 or shutil.which("rsync") is None:
        pytest.skip("needs root (owners, devices) and rsync")
    return sample_image(tmp_path_factory.mktemp("oci-sample"))


def by_path(tree: Tree) -> dict[str, Any]:
    """Each path's inode, and which earlier path it is a hard link of."""
    first: dict[int, str] = {}
    return {path: (inode, first.setdefault(number, path)) for path, number, inode in tree.walk()}


def assert_same_tree(got: Tree, directory: Path) -> None:
    expected = scan_directory(directory)
    assert by_path(got) == by_path(expected)
    assert got.fingerprint() == expected.fingerprint()


def layout_of(tmp_path: Path, sample: tuple[list[bytes], Path]) -> Path:
    return write_layout(tmp_path / "layout", sample[0], SAMPLE_COMPRESSIONS)


def test_layout_tar_of_layout_and_docker_save_give_the_expected_tree(
        tmp_path: Path, sample: tuple[list[bytes], Path]) -> None:
    layers, expected = sample
    layout = layout_of(tmp_path, sample)
    for path in (layout, tar_directory(layout, tmp_path / "layout.tar"),
                 write_docker_save(tmp_path / "saved.tar", layers)):
        source = OciSource(path)
        assert_same_tree(source.tree, expected)
        tree = source.tree
        assert tree.lookup("/usr/bin/chfn") == tree.lookup("/usr/bin/chfn-again")
        assert tree.lookup("/usr/bin/chfn") != tree.lookup("/usr/bin/passwd")
        assert not any(".wh." in p for p in tree.paths())


def test_objects_come_from_the_layers(tmp_path: Path, sample: tuple[list[bytes], Path]) -> None:
    source = OciSource(tar_directory(layout_of(tmp_path, sample), tmp_path / "layout.tar"))
    wanted = source.tree.object_sizes()
    got = {}
    for digest, size, opener in source.iter_objects(wanted):
        with opener() as reader:
            data = reader.read()
        assert digest not in got and hashlib.sha256(data).digest() == digest
        got[digest] = size
    assert got == wanted


def test_index_picks_this_machines_platform(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    mine = write_manifest(layout, image_manifest(
        layout, [python_tar_layer((tarfile.TarInfo("mine"), b"x"))], ["plain"]),
        {"os": "linux", "architecture": HERE})
    other = write_manifest(layout, image_manifest(
        layout, [python_tar_layer((tarfile.TarInfo("other"), b"y"))], ["plain"]),
        {"os": "linux", "architecture": "s390x" if HERE != "s390x" else "arm64"})
    attestation = {**other, "platform": {"os": "unknown", "architecture": "unknown"}}
    nested = put_blob(layout, json.dumps({"schemaVersion": 2, "manifests": [mine, other]})
                      .encode(), "application/vnd.oci.image.index.v1+json")
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                   "manifests": [nested, attestation]}))
    assert set(OciSource(layout).tree.paths()) == {"/", "/mine"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                   "manifests": [mine, mine]}))
    assert "names several images" in refusal(layout)


def refusal(path: Path) -> str:
    with pytest.raises(FleetError) as caught:
        OciSource(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def small_layout(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes],
                 compression: str = "gzip") -> Path:
    """A one-layer layout of hand-made members."""
    return write_layout(tmp_path / "layout", [python_tar_layer(*members)], [compression])


def manifest_of(layout: Path) -> tuple[dict[str, Any], Path]:
    index = json.loads((layout / "index.json").read_text())
    path = layout / "blobs/sha256" / index["manifests"][0]["digest"].removeprefix("sha256:")
    return json.loads(path.read_text()), path


def blob_path(layout: Path, descriptor: dict[str, Any]) -> Path:
    return layout / "blobs/sha256" / descriptor["digest"].removeprefix("sha256:")


def member(name: str, **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    for field, value in fields.items():
        setattr(info, field, value)
    return info, b"data"


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def edit_manifest(layout: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest, _ = manifest_of(layout)
    change(manifest)
    write_manifest(layout, manifest)


def _layer_type(value: str) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["layers"][0].update(mediaType=value)


def _layer_size(m: dict[str, Any]) -> None:
    m["layers"][0]["size"] += 1


@pytest.mark.parametrize(("breaking", "words"), [
    (lambda layout: flip_last_byte(blob_path(layout, manifest_of(layout)[0]["layers"][0])),
     ["layer 1 of", "digest mismatch"]),
    (lambda layout: flip_last_byte(manifest_of(layout)[1]), ["digest mismatch"]),
    (lambda layout: blob_path(layout, manifest_of(layout)[0]["layers"][0]).unlink(),
     ["missing blobs/sha256/"]),
    (lambda layout: blob_path(layout, manifest_of(layout)[0]["config"]).unlink(),
     ["missing blobs/sha256/"]),
    (lambda layout: (layout / "index.json").write_text('{"manifests": ['),
     ["index.json", "malformed JSON"]),
    (lambda layout: (layout / "index.json").write_text('[]'), ["index.json", "not a JSON object"]),
    (lambda layout: (layout / "index.json").write_bytes(b'{"a": "\xff"}'), ["not UTF-8"]),
    (lambda layout: (layout / "oci-layout").write_text('{}'), ["imageLayoutVersion"]),
    (lambda layout: edit_manifest(layout, _layer_type(LAYER_TYPES["gzip"] + "+encrypted")),
     ["unknown media type", "+encrypted"]),
    (lambda layout: edit_manifest(layout, _layer_size), ["bytes where its descriptor says"]),
    (lambda layout: edit_manifest(layout, lambda m: m["layers"][0].update(digest="md5:00")),
     ["is not sha256:"]),
    (lambda layout: edit_manifest(layout, lambda m: m.update(layers={})), ["no list of layers"]),
    (lambda layout: edit_manifest(layout, lambda m: m.update(schemaVersion=1)),
     ["schemaVersion"]),
    (lambda layout: (layout / "index.json").write_text('{"manifests": []}'),
     ["names no image manifest"]),
    (lambda layout: shutil.rmtree(layout / "blobs"), ["missing blobs/sha256/"]),
    (lambda layout: (layout / "oci-layout").unlink(), ["neither an OCI image layout"]),
])
def test_bad_layouts_are_refused(tmp_path: Path, breaking: Callable[[Path], None],
                                 words: list[str]) -> None:
    layout = small_layout(tmp_path, member("etc/x"))
    breaking(layout)
    message = refusal(layout)
    for word in words:
        assert word in message


@pytest.mark.parametrize(("members", "words"), [
    ([member("../evil")], ["layer 1 of", "member '../evil'", "'..' in path"]),
    ([member("/etc/passwd")], ["absolute path"]),
    ([member("etc", type=tarfile.SYMTYPE, linkname="/etc"), member("etc/passwd")],
     ["/etc is a symlink"]),
    ([member(".wh.etc/passwd")], ["whiteout '.wh.etc' used as a directory"]),
    ([member("etc/.wh...")], ["invalid file name '..'"]),
    ([member("h", type=tarfile.LNKTYPE, linkname="nothere")], ["no earlier member"]),
])
def test_bad_layer_members_are_refused(tmp_path: Path, members: list, words: list[str]) -> None:
    message = refusal(small_layout(tmp_path, *members))
    assert message.startswith("bad layer 1 of ")
    for word in words:
        assert word in message


def test_damaged_layer_is_refused_even_with_a_matching_digest(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    whole = python_tar_layer(member("a"), member("b"))
    write_manifest(layout, {"schemaVersion": 2, "config": put_blob(layout, b"{}", "x"),
                            "layers": [put_blob(layout, whole[:700], LAYER_TYPES["plain"])]})
    assert refusal(layout).startswith("truncated or corrupt layer 1 of ")


def test_whiteouts_act_on_lower_layers_only(tmp_path: Path) -> None:
    """Whatever order a layer lists them in, its whiteouts never hide its own entries;
    aufs' reserved .wh..wh. names are skipped."""
    lower = python_tar_layer(member("d/old"), member("d/sub/old"), member("gone"))
    upper = python_tar_layer(member("d/new"), member("d/sub/new"), member("d/.wh..wh..opq"),
                             member("gone"), member(".wh.gone"), member(".wh..wh.plnk/1"))
    layout = write_layout(tmp_path / "layout", [lower, upper], ["plain", "zstd"])
    assert set(OciSource(layout).tree.paths()) == {"/", "/d", "/d/new", "/d/sub",
                                                   "/d/sub/new", "/gone"}


def test_bad_docker_save_is_refused(tmp_path: Path) -> None:
    layers = [python_tar_layer(member("a")), python_tar_layer(member("b"))]
    saved = write_docker_save(tmp_path / "saved.tar", layers)
    assert set(OciSource(saved).tree.paths()) == {"/", "/a", "/b"}

    def rewrite(name: str, data: bytes) -> Path:
        out = tmp_path / "bad.tar"
        with tarfile.open(saved) as tar, tarfile.open(out, "w") as bad:
            for info in tar.getmembers():
                content = data if info.name == name else tar.extractfile(info).read()
                info.size = len(content)
                bad.addfile(info, io.BytesIO(content))
        return out

    with tarfile.open(saved) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        layer_name = manifest[0]["Layers"][1]
    assert "digest mismatch" in refusal(rewrite(layer_name, layers[1] + b"\0" * 512))
    assert "malformed JSON" in refusal(rewrite("manifest.json", b"[{"))
    two = json.dumps(manifest * 2).encode()
    assert "not one image (2 images)" in refusal(rewrite("manifest.json", two))
    escaping = json.dumps([{**manifest[0], "Layers": ["../x/layer.tar", layer_name]}]).encode()
    assert "not a relative path inside the image" in refusal(rewrite("manifest.json", escaping))
    unnamed = json.dumps([{**manifest[0], "Config": "config.json"}]).encode()
    assert "not named by its digest" in refusal(rewrite("manifest.json", unnamed))
    missing = json.dumps([{**manifest[0],
                           "Layers": [manifest[0]["Layers"][0], "nothere/layer.tar"]}]).encode()
    assert "missing nothere/layer.tar" in refusal(rewrite("manifest.json", missing))
    (tmp_path / "saved.tar.gz").write_bytes(gzip.compress(saved.read_bytes()))
    assert "is compressed" in refusal(tmp_path / "saved.tar.gz")
    (tmp_path / "cut.tar").write_bytes(saved.read_bytes()[:1000])
    assert refusal(tmp_path / "cut.tar")
    assert "neither an OCI image layout" in refusal(tmp_path)


def test_layer_of_a_real_tree_keeps_every_inode_field(tmp_path: Path,
                                                       sample: tuple[list[bytes], Path]) -> None:
    """One GNU tar layer of the sample's expected tree is that tree exactly."""
    _, expected = sample
    layout = write_layout(tmp_path / "layout", [gnu_tar_layer(expected)], ["zstd"])
    assert_same_tree(OciSource(layout).tree, expected)
