"""`dominator`: the admin CLI and the central daemon (`dominator serve`), one
module per command group."""

from __future__ import annotations

import importlib

import click

from fleetlib.cli.run import CONTEXT_SETTINGS, EXIT_CODES_HELP, run, version_option

# Command group -> "module:attribute", imported only when that group runs (or --help
# lists them): a command then loads only what it uses, and starts in a fraction of the
# time the whole program would take to import.
COMMANDS = {
    "audit": "dominator.cli.audit:audit",
    "certs": "dominator.cli.certs:certs",
    "db": "dominator.cli.db:db",
    "deploy": "dominator.cli.deploy:deploy",
    "fleet": "dominator.cli.fleet:fleet",
    "image": "dominator.cli.image:image",
    "keys": "dominator.cli.keys:keys",
    "mdb": "dominator.cli.mdb:mdb",
    "quickstart": "dominator.cli.quickstart:quickstart",
    "serve": "dominator.cli.serve:serve_command",
    "sub": "dominator.cli.sub:sub",
    "tokens": "dominator.cli.tokens:tokens",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use (see COMMANDS)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command), target
        return command


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS, epilog=EXIT_CODES_HELP)
@version_option("dominator")
def cli() -> None:
    """Fleet image convergence: images, hosts, the machine database and the fleet.

    Connection settings come from options or the environment: DOMINATOR_TLS_DIR
    (identity folder), DOMINATOR_IMAGESERVER and DOMINATOR_ADDRESS (HOST:PORT),
    DOMINATOR_URL and DOMINATOR_TOKEN (the deploy API).
    """


def main() -> None:
    """Console entry point."""
    run(cli)
