"""`dominator`: the admin CLI and the central daemon (`dominator serve`), one
module per command group."""

from __future__ import annotations

import click

from dominator.cli.audit import audit
from dominator.cli.certs import certs
from dominator.cli.deploy import deploy
from dominator.cli.fleet import fleet
from dominator.cli.image import image
from dominator.cli.mdb import mdb
from dominator.cli.quickstart import quickstart
from dominator.cli.serve import serve_command
from dominator.cli.sub import sub
from dominator.cli.tokens import tokens
from fleetlib.cli.run import CONTEXT_SETTINGS, EXIT_CODES_HELP, run, version_option


@click.group(context_settings=CONTEXT_SETTINGS, epilog=EXIT_CODES_HELP)
@version_option("dominator")
def cli() -> None:
    """Fleet image convergence: images, hosts, the machine database and the fleet.

    Connection settings come from options or the environment: DOMINATOR_TLS_DIR
    (identity folder), DOMINATOR_IMAGESERVER and DOMINATOR_ADDRESS (HOST:PORT),
    DOMINATOR_URL and DOMINATOR_TOKEN (the deploy API).
    """


cli.add_command(image)
cli.add_command(certs)
cli.add_command(quickstart)
cli.add_command(sub)
cli.add_command(fleet)
cli.add_command(mdb)
cli.add_command(serve_command)
cli.add_command(deploy)
cli.add_command(tokens)
cli.add_command(audit)


def main() -> None:
    """Console entry point."""
    run(cli)
