"""`dominator certs`: make a certificate authority and issue identities.

Every gRPC port uses mutual TLS; a certificate's subject CN is the caller's identity
and the RPC methods it may call are glob patterns carried in the certificate.
"""

from __future__ import annotations

from pathlib import Path

import click

from fleetlib.errors import FleetError
from fleetlib.rpc.certs import CA_CERT, CA_KEY, CERT, KEY, ROLE_METHODS, init_ca, issue


@click.group(name="certs")
def certs() -> None:
    """Make a CA and issue certificates (identity = subject CN, methods = globs).

    `certs init DIR` creates the CA and one ready identity folder per role
    (admin, imageserver, subd, dominator); point a program at one with
    --tls-dir DIR/ROLE or DOMINATOR_TLS_DIR.
    """


@certs.command(name="init")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
def init_command(directory: Path) -> None:
    """Create a CA in DIR (ca.pem, ca.key) and identities DIR/admin, DIR/imageserver,
    DIR/subd and DIR/dominator. Refuses if DIR already holds a CA key."""
    init_ca(directory)
    click.echo(f"wrote {directory / CA_CERT}")
    click.echo(f"wrote {directory / CA_KEY} (keep it secret: it signs every identity)")
    for role, methods in ROLE_METHODS.items():
        click.echo(f"wrote identity {directory / role}/ (methods: {','.join(methods)})")


@certs.command(name="issue")
@click.argument("name")
@click.option(
    "--methods",
    required=True,
    help="Comma-separated Service.Method globs it may call, e.g. 'Subd.*,ImageServer.GetImage'.",
)
@click.option(
    "--ca",
    "ca_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The CA folder made by `certs init`.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Identity folder to write (ca.pem, cert.pem, key.pem).",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Extra DNS name or IP address the holder serves at (repeatable).",
)
def issue_command(
    name: str, methods: str, ca_dir: Path, out_dir: Path, hosts: tuple[str, ...]
) -> None:
    """Issue an identity NAME (the certificate's CN) into --out, signed by the CA in --ca.

    A server's certificate must be named after its role (imageserver, subd,
    dominator): clients check the server's name against the role, not its address.
    """
    patterns = [p.strip() for p in methods.split(",") if p.strip()]
    if not patterns:
        raise FleetError("--methods: give at least one Service.Method pattern")
    issue(name, patterns, ca_dir, out_dir, hosts)
    for file in (CA_CERT, CERT, KEY):
        click.echo(f"wrote {out_dir / file}")
    click.echo(f"identity {name!r} may call: {','.join(patterns)}")
