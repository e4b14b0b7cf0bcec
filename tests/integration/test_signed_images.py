"""Signed images with real daemons over mutual TLS: key pairs, signing on `image add`,
the image server refusing a signature that does not verify, and a dominator with
`--trusted-keys` converging only images signed by a trusted key."""

from __future__ import annotations

import dataclasses
import json
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from fleetlib.fstree.image import ImageSignature
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import Daemon, assert_one_line_error, cli
from fleetlib.testing.fleet import FleetUnderTest, names, wait_for
from fleetlib.testing.trees import make_tree
from imageserver.client import ImageServerClient


def create_key(env: dict[str, str], name: str, out: Path) -> Path:
    """`dominator keys create NAME --out OUT`; the private key's path."""
    cli("keys", "create", name, "--out", str(out), env=env, check=True)
    return out / f"{name}.key"


def add_image(env: dict[str, str], name: str, source: Path, *extra: str) -> None:
    """`dominator image add NAME SOURCE EXTRA...` (it must succeed)."""
    cli("image", "add", name, str(source), *extra, env=env, check=True)


def test_keys_create_writes_a_private_key_only_its_owner_reads(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "keys"
    private = create_key(cli_env, "release", out)
    public = out / "release.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    before = private.read_bytes()
    assert_one_line_error(cli("keys", "create", "release", "--out", str(out), env=cli_env),
                          "release.key exists", code=4)
    assert private.read_bytes() == before
    assert_one_line_error(cli("keys", "create", "../evil", "--out", str(out), env=cli_env),
                          "invalid key name")


def test_a_signed_image_names_its_signer_and_a_tampered_one_is_refused(
        tmp_path: Path, cli_env: dict[str, str], admin: Security, imageserver: Daemon) -> None:
    private = create_key(cli_env, "release", tmp_path / "keys")
    source = make_tree(tmp_path / "tree")
    add_image(cli_env, "signed", source, "--sign-key", str(private))
    add_image(cli_env, "plain", source)

    shown = cli("image", "show", "signed", env=cli_env, check=True)
    assert "signed by release (SHA256:" in shown.stderr
    assert "unsigned" in cli("image", "show", "plain", env=cli_env, check=True).stderr
    signature = json.loads(cli("image", "show", "signed", "--json", env=cli_env,
                               check=True).stdout)["signature"]
    assert signature["key_name"] == "release" and signature["fingerprint"].startswith("SHA256:")
    assert json.loads(cli("image", "show", "plain", "--json", env=cli_env,
                          check=True).stdout)["signature"] is None

    # The same manifest under another name, a changed filter or a foreign signature:
    # the signature no longer verifies against the key it carries.
    with ImageServerClient(imageserver.address, admin) as client:
        image = client.get_image("signed")
        assert image.signature is not None
        forged = ImageSignature(image.signature.key_name, image.signature.public_key,
                                bytes(64))
        for tampered in (dataclasses.replace(image, name="renamed"),
                         dataclasses.replace(image, name="sparse", filter=None),
                         dataclasses.replace(image, name="forged", signature=forged)):
            with pytest.raises(grpc.RpcError) as refused:
                client.add_image(tampered)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not verify" in str(refused.value.details())
            assert not client.image_exists(tampered.name)


def test_bad_keys_get_one_line_errors(tmp_path: Path, cli_env: dict[str, str]) -> None:
    keys = tmp_path / "keys"
    private = create_key(cli_env, "loose", keys)
    private.chmod(0o644)
    source = make_tree(tmp_path / "tree")
    assert_one_line_error(cli("image", "add", "x", str(source), "--sign-key", str(private),
                              env=cli_env), "loose.key", "group or others")
    not_a_key = tmp_path / "garbage.key"
    not_a_key.write_text("not a key\n")
    not_a_key.chmod(0o600)
    assert_one_line_error(cli("image", "add", "x", str(source), "--sign-key", str(not_a_key),
                              env=cli_env), "garbage.key", "not an Ed25519 private key")

    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(keys / "loose.pub", trusted / "good.pub")
    (trusted / "broken.pub").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n")
    serve = ("serve", "--state-dir", str(tmp_path / "state"), "--trusted-keys")
    assert_one_line_error(cli(*serve, str(trusted), env=cli_env), "broken.pub")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli(*serve, str(empty), env=cli_env), "no trusted keys")


def test_dominator_converges_only_images_signed_by_a_trusted_key(
        tmp_path: Path, ca: Path, imageserver: Daemon, cli_env: dict[str, str],
        start_subd: Callable[..., Daemon]) -> None:
    keys, trusted = tmp_path / "keys", tmp_path / "trusted"
    trusted.mkdir()
    old, new = (create_key(cli_env, name, keys) for name in ("old", "new"))
    stranger = create_key(cli_env, "stranger", keys)
    for name in ("old", "new"):  # a rotation: both keys trusted while images move over
        shutil.copy(keys / f"{name}.pub", trusted)
    source = make_tree(tmp_path / "tree")
    add_image(cli_env, "by-old", source, "--sign-key", str(old))
    (source / "etc/motd").write_text("signed by the new key\n")
    add_image(cli_env, "by-new", source, "--sign-key", str(new))
    add_image(cli_env, "unsigned", source)
    add_image(cli_env, "by-stranger", source, "--sign-key", str(stranger))

    (tmp_path / "fleet").mkdir()
    fleet = FleetUnderTest(tmp_path / "fleet", ca, imageserver, start_subd, hosts=2,
                           serve_args=("--trusted-keys", str(trusted)))
    try:
        for host, sub, image in zip(names(1, 2), fleet.subs, ("by-old", "unsigned"),
                                    strict=True):
            fleet.run("mdb", "set", host, "--address", sub.address, "--required-image", image)
        fleet.wait_status(names(1), "synced", "by-old")
        held = fleet.wait_status(names(2), "image not trusted")["host-2"]
        assert "image unsigned is unsigned" in held["last_error"]
        assert not (fleet.root("host-2") / "etc").exists()

        fleet.run("mdb", "set", "host-2", "--required-image", "by-stranger")
        wait_for(lambda: "stranger" in fleet.hosts()["host-2"]["last_error"],
                 "host-2 says the stranger's key is not trusted")
        held = fleet.hosts()["host-2"]
        assert held["status"] == "image not trusted" and "not trusted" in held["last_error"]
        assert not (fleet.root("host-2") / "etc").exists()

        fleet.run("mdb", "set", "host-2", "--required-image", "by-new")
        fleet.wait_status(names(2), "synced", "by-new")
        assert (fleet.root("host-2") / "etc/motd").read_text() == "signed by the new key\n"
    finally:
        fleet.stop()
