"""`dominator`: the admin CLI (and, in later work, the central daemon)."""

from __future__ import annotations

import click

from dominator.certs_cli import certs
from dominator.deploy_cli import deploy
from dominator.fleet_cli import fleet, mdb
from dominator.image_cli import image
from dominator.quickstart import quickstart
from dominator.serve import serve_command
from dominator.sub_cli import sub
from fleetlib.cli.run import run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Fleet image convergence: images, hosts, the machine database and the fleet.

    Connection settings come from options or the environment: DOMINATOR_TLS_DIR
    (identity folder), DOMINATOR_IMAGESERVER and DOMINATOR_ADDRESS (HOST:PORT).
    """


cli.add_command(image)
cli.add_command(certs)
cli.add_command(quickstart)
cli.add_command(sub)
cli.add_command(fleet)
cli.add_command(mdb)
cli.add_command(serve_command)
cli.add_command(deploy)


def main() -> None:
    """Console entry point."""
    run(cli)


if __name__ == "__main__":
    main()
