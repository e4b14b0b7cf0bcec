"""`dominator image ...` against a real image server: exact round trips, upload
deduplication, tarballs, container images, listings, diffs, and one-line refusals of bad
input."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from fleetlib.testing.daemons import Daemon, assert_one_line_error, cli
from fleetlib.testing.oci import (
    SAMPLE_COMPRESSIONS,
    python_tar_layer,
    sample_image,
    tar_directory,
    write_docker_save,
    write_layout,
)
from fleetlib.testing.trees import make_tree, rsync_differences

needs_rsync = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")


def stored_state(daemon: Daemon) -> tuple[list[str], list[str]]:
    """(image files, object files) of an image server's state directory."""
    assert daemon.state_dir is not None
    images = sorted(str(p.relative_to(daemon.state_dir)) for p in
                    (daemon.state_dir / "images").rglob(".image"))
    objects = sorted(p.name for p in (daemon.state_dir / "objects").rglob("*")
                     if p.is_file() and ".tmp" not in p.parts)
    return images, objects


@needs_rsync
def test_synthetic_round_trip_is_exact(tmp_path: Path, cli_env: dict[str, str]) -> None:
    source = make_tree(tmp_path / "src", big_file_bytes=100 << 20)
    added = cli("image", "add", "synthetic", str(source), "--json", env=cli_env, check=True)
    report = json.loads(added.stdout)
    assert report["uploaded_bytes"] > 100 << 20 and report["skipped_objects"] == 0
    dest = tmp_path / "dest"
    cli("image", "get", "synthetic", str(dest), env=cli_env, check=True)
    assert rsync_differences(source, dest) == ""
    assert os.getxattr(dest / "usr/bin/ping", "security.capability")
    assert (dest / "usr/bin/passwd").stat().st_ino == (dest / "usr/bin/chfn").stat().st_ino


def test_show_lists_like_ls(tmp_path: Path, cli_env: dict[str, str]) -> None:
    source = make_tree(tmp_path / "src")
    cli("image", "add", "team/web", str(source), env=cli_env, check=True)
    shown = cli("image", "show", "team/web", env=cli_env, check=True).stdout.splitlines()
    assert "drwxr-xr-x 1 0 0 - - /" in shown
    assert any(line.startswith("-rwsr-xr-x 2 0 0 20004 ") and line.endswith("/usr/bin/passwd")
               for line in shown)
    assert any(line.startswith("crw-rw-rw- 1 0 0 1,3 ") for line in shown)
    assert "lrwxrwxrwx 1 0 0 - - /bin -> usr/bin" in shown
    assert any(line.endswith("/etc/caf\\xe9-latin1") for line in shown)
    assert any("/usr/bin/ping [security.capability]" in line for line in shown)
    listed = json.loads(cli("image", "list", "--json", env=cli_env, check=True).stdout)
    assert [i["name"] for i in listed] == ["team/web"]


def test_second_image_uploads_only_new_objects(tmp_path: Path, cli_env: dict[str, str]) -> None:
    source = make_tree(tmp_path / "src")
    first = json.loads(cli("image", "add", "v1", str(source), "--json", env=cli_env,
                           check=True).stdout)
    new_content = os.urandom(70_000)
    (source / "usr/bin/newtool").write_bytes(new_content)
    (source / "etc/hostname").write_text("changed\n")
    second = json.loads(cli("image", "add", "v2", str(source), "--json", env=cli_env,
                            check=True).stdout)
    assert second["uploaded_objects"] == 2
    assert second["uploaded_bytes"] == len(new_content) + len("changed\n")
    assert second["skipped_objects"] == first["uploaded_objects"] - 1  # old hostname is gone
    text = cli("image", "add", "v3", str(source), env=cli_env, check=True).stdout
    assert "uploaded 0 objects" in text and "skipped" in text


def test_diff_exit_codes_and_listing(tmp_path: Path, cli_env: dict[str, str]) -> None:
    source = make_tree(tmp_path / "src")
    cli("image", "add", "a", str(source), env=cli_env, check=True)
    cli("image", "add", "a-again", str(source), env=cli_env, check=True)
    same = cli("image", "diff", "a", "a-again", env=cli_env)
    assert same.returncode == 0 and same.stdout == ""
    (source / "etc/new").write_text("x")
    (source / "etc/hostname").chmod(0o600)
    (source / "etc/ssl/cert.pem").unlink()
    cli("image", "add", "b", str(source), env=cli_env, check=True)
    differ = cli("image", "diff", "a", "b", env=cli_env)
    assert differ.returncode == 1
    marks = {line.split()[0] + " " + next(w for w in line.split() if w.startswith("/"))
             for line in differ.stdout.splitlines() if not line.startswith("  ")}
    assert marks == {"+ /etc/new", "m /etc/hostname", "- /etc/ssl/cert.pem"}


@needs_rsync
def test_tarball_sources_equal_directory_source(tmp_path: Path, cli_env: dict[str, str]) -> None:
    source = make_tree(tmp_path / "src")
    fast = {**os.environ, "XZ_OPT": "-0", "BZIP2": "-1"}
    tarballs = {}
    for name, flags in (("plain.tar", []), ("gz.tar.gz", ["-z"]), ("zst.tar.zst", ["--zstd"]),
                        ("xz.tar.xz", ["-J"]), ("bz2.tar.bz2", ["-j"])):
        tarball = tmp_path / name
        made = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                               "--format=posix", *flags, "-cpf", str(tarball), "-C",
                               str(source), "."], capture_output=True, env=fast)
        if made.returncode != 0:
            pytest.skip(f"tar cannot make {name}: {made.stderr.decode().strip()}")
        tarballs[name.split(".")[0]] = tarball
    # first, on its own: every object is read from the xz stream
    cli("image", "add", "xz", str(tarballs.pop("xz")), env=cli_env, check=True)
    cli("image", "get", "xz", str(tmp_path / "unpacked"), env=cli_env, check=True)
    assert rsync_differences(source, tmp_path / "unpacked") == ""
    cli("image", "add", "from-dir", str(source), env=cli_env, check=True)
    for image, tarball in tarballs.items():
        result = json.loads(cli("image", "add", image, str(tarball), "--json", env=cli_env,
                                check=True).stdout)
        assert result["uploaded_objects"] == 0  # all content was already there
        assert cli("image", "diff", "from-dir", image, env=cli_env).returncode == 0


def test_filter_triggers_and_computed_files_are_stored(tmp_path: Path,
                                                       cli_env: dict[str, str]) -> None:
    source = make_tree(tmp_path / "src")
    (tmp_path / "filter").write_text("/var/lib/.*\n/etc/hostname\n")
    (tmp_path / "triggers").write_text(
        '# restart the web server\n[{"MatchLines": ["/etc/ssl/.*"], "Service": "nginx"}]\n')
    (tmp_path / "computed").write_text('[{"Filename": "/etc/hostname", "Source": "hostname"}]')
    # the computed file must be in the tree, so it cannot also be filtered
    refused = cli("image", "add", "bad", str(source), "--filter", str(tmp_path / "filter"),
                  "--computed-files", str(tmp_path / "computed"), env=cli_env)
    assert_one_line_error(refused, "computed file /etc/hostname")
    (tmp_path / "filter").write_text("/var/lib/.*\n")
    cli("image", "add", "web", str(source), "--filter", str(tmp_path / "filter"),
        "--triggers", str(tmp_path / "triggers"), "--computed-files",
        str(tmp_path / "computed"), "--expires-in", "7d", env=cli_env, check=True)
    shown = json.loads(cli("image", "show", "web", "--json", env=cli_env, check=True).stdout)
    assert shown["filter"] == ["/var/lib/.*"]
    assert shown["triggers"][0]["Service"] == "nginx"
    assert shown["computed_files"] == [{"Filename": "/etc/hostname", "Source": "hostname"}]
    assert shown["expires"] > 0
    paths = [next(w for w in line.split() if w.startswith("/")) for line in shown["listing"]]
    assert "/var/lib" in paths and "/var/lib/app.db" not in paths
    sparse = json.loads(cli("image", "show", "web", "--json", env=cli_env).stdout)
    assert sparse["filter"] is not None
    cli("image", "add", "sparse", str(source), "--sparse", env=cli_env, check=True)
    assert json.loads(cli("image", "show", "sparse", "--json", env=cli_env).stdout)["filter"] \
        is None


def test_delete_frees_only_unshared_objects(tmp_path: Path, cli_env: dict[str, str],
                                            imageserver: Daemon) -> None:
    source = make_tree(tmp_path / "src")
    cli("image", "add", "one", str(source), env=cli_env, check=True)
    (source / "etc/only-in-two").write_bytes(os.urandom(5000))
    cli("image", "add", "two", str(source), env=cli_env, check=True)
    _, before = stored_state(imageserver)
    out = cli("image", "delete", "two", "--force", env=cli_env, check=True).stdout  # no MDB
    assert "freed 1 objects" in out
    _, after = stored_state(imageserver)
    assert len(after) == len(before) - 1
    dest = tmp_path / "dest"
    cli("image", "get", "one", str(dest), env=cli_env, check=True)
    assert_one_line_error(cli("image", "delete", "two", "--force", env=cli_env),
                          "unknown image two", code=1)


def _tarball(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    """A tar of (name, content or None for a symlink, symlink target)."""
    with tarfile.open(path, "w") as tar:
        for name, content, target in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type, info.linkname = tarfile.SYMTYPE, target or ""
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def test_bad_input_is_refused_in_one_line(tmp_path: Path, cli_env: dict[str, str],
                                          imageserver: Daemon, ca: Path) -> None:
    good = make_tree(tmp_path / "src")
    cli("image", "add", "good", str(good), env=cli_env, check=True)
    before = stored_state(imageserver)
    bad_tars = {
        "dotdot": _tarball(tmp_path / "dotdot.tar", [("../evil", b"x", None)]),
        "absolute": _tarball(tmp_path / "abs.tar", [("/etc/passwd", b"x", None)]),
        "symlink-dir": _tarball(tmp_path / "link.tar",
                                [("etc", None, "/etc"), ("etc/passwd", b"owned", None)]),
    }
    for name, path in bad_tars.items():
        assert_one_line_error(cli("image", "add", name, str(path), env=cli_env), "tarball")
    truncated = tmp_path / "truncated.tar.gz"
    subprocess.run(["tar", "-czf", str(tmp_path / "full.tar.gz"), "-C", str(good), "."],
                   check=True)
    data = (tmp_path / "full.tar.gz").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli("image", "add", "trunc", str(truncated), env=cli_env),
                          "truncated or corrupt")
    (tmp_path / "bad-filter").write_text("/ok/.*\n/broken[\n")
    assert_one_line_error(cli("image", "add", "f", str(good), "--filter",
                              str(tmp_path / "bad-filter"), env=cli_env), "line 2", "regex")
    (tmp_path / "bad-triggers").write_text('[{"MatchLines": ["/etc/.*"], "Service": ')
    assert_one_line_error(cli("image", "add", "t", str(good), "--triggers",
                              str(tmp_path / "bad-triggers"), env=cli_env), "malformed json")
    assert_one_line_error(cli("image", "add", "../x", str(good), env=cli_env),
                          "invalid image name")
    assert_one_line_error(cli("image", "add", "good", str(good), env=cli_env), "already exists")
    assert_one_line_error(cli("image", "show", "missing", env=cli_env), "unknown image",
                          code=1)
    assert_one_line_error(cli("image", "get", "good", str(good), env=cli_env), "not empty")
    assert_one_line_error(cli("image", "add", "x", str(tmp_path / "nowhere"), env=cli_env))
    for path, words in _bad_container_images(tmp_path / "oci"):
        assert_one_line_error(cli("image", "add", "x", "--from-oci", str(path), env=cli_env),
                              *words)
    assert_one_line_error(cli("image", "add", "x", str(good), "--from-oci", str(good),
                              env=cli_env), "SOURCE", "--from-oci")
    no_identity = {**cli_env, "DOMINATOR_TLS_DIR": ""}
    assert_one_line_error(cli("image", "list", env=no_identity), "no TLS identity")
    subd_identity = {**cli_env, "DOMINATOR_TLS_DIR": str(ca / "subd")}
    assert_one_line_error(cli("image", "list", env=subd_identity), "permission denied",
                          "ImageServer.ListImages", code=4)
    assert_one_line_error(cli("image", "list", "--insecure", env=cli_env), code=3)
    assert stored_state(imageserver) == before


@needs_rsync
def test_container_images_unpack_to_what_their_layers_make(tmp_path: Path,
                                                           cli_env: dict[str, str]) -> None:
    """A tar of an OCI layout and a `docker save` tarball of the three-layer sample (gzip,
    zstd and plain layers; replaced files, whiteouts, an opaque directory, hard links
    within and across layers) are one image: exactly the directory expected."""
    layers, expected = sample_image(tmp_path / "sample")
    layout = write_layout(tmp_path / "layout", layers, SAMPLE_COMPRESSIONS)
    archive = tar_directory(layout, tmp_path / "layout.tar")
    added = json.loads(cli("image", "add", "oci/tar", "--from-oci", str(archive), "--json",
                           env=cli_env, check=True).stdout)
    assert added["skipped_objects"] == 0
    cli("image", "get", "oci/tar", str(tmp_path / "dest"), env=cli_env, check=True)
    assert rsync_differences(expected, tmp_path / "dest") == ""
    saved = write_docker_save(tmp_path / "saved.tar", layers)
    again = json.loads(cli("image", "add", "oci/saved", "--from-oci", str(saved), "--json",
                           env=cli_env, check=True).stdout)
    assert again["uploaded_objects"] == 0 and again["inodes"] == added["inodes"]
    assert cli("image", "diff", "oci/tar", "oci/saved", env=cli_env).returncode == 0


def _bad_container_images(work: Path) -> list[tuple[Path, list[str]]]:
    """(image, words its refusal holds): a layer blob not matching its digest, a layer
    member escaping the root, a missing blob, malformed index.json and manifest.json."""
    def layout(name: str, *members: str) -> tuple[Path, Path]:
        tar = python_tar_layer(*((tarfile.TarInfo(m), b"x") for m in members))
        path = write_layout(work / name, [tar], ["gzip"])
        return path, next(p for p in (path / "blobs/sha256").iterdir()
                          if p.read_bytes()[:2] == b"\x1f\x8b")  # the layer

    mismatch, blob = layout("mismatch", "etc/x")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    missing, blob = layout("missing", "etc/x")
    blob.unlink()
    malformed, _ = layout("malformed", "etc/x")
    (malformed / "index.json").write_text('{"schemaVersion": 2, "manifests": [')
    saved = write_docker_save(work / "saved.tar", [python_tar_layer()])
    with tarfile.open(saved) as tar, tarfile.open(work / "bad-saved.tar", "w") as bad:
        for info in tar.getmembers():
            member = tar.extractfile(info)
            content = b"[{" if info.name == "manifest.json" or member is None else member.read()
            info.size = len(content)
            bad.addfile(info, io.BytesIO(content))
    return [(mismatch, ["layer 1 of", "digest mismatch"]),
            (layout("escape", "etc/x", "../../etc/passwd")[0], ["bad layer 1", "'..' in path"]),
            (missing, ["missing blobs/sha256/" + blob.name]),
            (malformed, ["index.json", "malformed JSON"]),
            (work / "bad-saved.tar", ["manifest.json", "malformed JSON"])]


def test_failed_get_leaves_the_folder_as_it_was(tmp_path: Path, cli_env: dict[str, str]) -> None:
    source = tmp_path / "src"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "motd").write_text("hello\n")
    (source / ".image-get.unfinished").write_text("the name image get works under\n")
    cli("image", "add", "marked", str(source), env=cli_env, check=True)
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for dest in (missing, empty):
        assert_one_line_error(cli("image", "get", "marked", str(dest), env=cli_env),
                              ".image-get.unfinished")
    assert not missing.exists() and list(empty.iterdir()) == []
