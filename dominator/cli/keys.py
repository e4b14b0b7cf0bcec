"""`dominator keys ...`: Ed25519 key pairs that sign images (fleetlib/signing.py)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from dominator.cli.options import json_option
from fleetlib.cli.display import echo_json
from fleetlib.errors import ExistsError, FleetError
from fleetlib.fstree.objectstore import write_file_atomically
from fleetlib.signing import (
    PRIVATE_SUFFIX,
    PUBLIC_SUFFIX,
    fingerprint,
    load_public_key,
    new_key_pair,
)

KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,99}")


@click.group(name="keys")
def keys() -> None:
    """Signing keys: `image add --sign-key DIR/NAME.key` signs an image, `subd` and
    `dominator serve --trusted-keys DIR` trust the folder's *.pub keys."""


@keys.command(name="create")
@click.argument("name")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for NAME.key (private, mode 0600) and NAME.pub (created if missing).")
@json_option
def create_command(name: str, out: Path, as_json: bool) -> None:
    """Make key pair NAME: OUT/NAME.key (keep it secret) and OUT/NAME.pub (give it to
    whoever checks signatures). Never overwrites a key."""
    if not KEY_NAME_RE.fullmatch(name):
        raise FleetError(f"invalid key name {name!r}: letters, digits and ._@- (at most 100), "
                         "starting with a letter or digit")
    private_path, public_path = out / f"{name}{PRIVATE_SUFFIX}", out / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise ExistsError(f"{path} exists: a key is never overwritten (pick another name)")
    private, public = new_key_pair()
    # Never overwrite, even racing another `keys create NAME`: the loser stops at the
    # private key, written first, so no public key outlives a lost race.
    for path, data, mode in ((private_path, private, 0o600), (public_path, public, 0o644)):
        try:
            write_file_atomically(path, data, mode=mode, overwrite=False)
        except FileExistsError:
            raise ExistsError(f"{path} exists: a key is never overwritten (pick another "
                              "name)") from None
        except OSError as err:
            raise FleetError(f"cannot write the key pair in {out}: {err.strerror}") from None
    shown = fingerprint(load_public_key(public_path))
    if as_json:
        echo_json({"name": name, "private_key": str(private_path),
                   "public_key": str(public_path), "fingerprint": shown})
        return
    click.echo(f"created key {name} ({shown}): private {private_path} (keep it secret), "
               f"public {public_path}")
