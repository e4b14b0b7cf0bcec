"""`dominator`: the admin CLI and the central daemon (`dominator serve`), one
module per command group."""

from __future__ import annotations

import click

from fleetlib.cli.lazy import Lazy, LazyGroup
from fleetlib.cli.run import CONTEXT_SETTINGS, EXIT_CODES_HELP, run, version_option

# Each command group's module is imported only when that group runs: a command then
# loads only what it uses, and `dominator --help` (which lists these summaries) loads
# none of them.
COMMANDS = {
    "audit": Lazy("dominator.cli.audit:audit",
                  "Who changed what, when: image adds, deletes and expiries (the image "
                  "server), MDB changes, the fleet-wide switch, safety clearances, intrusion "
                  "acknowledgements, fast updates, deploys and tokens (the dominator)."),
    "certs": Lazy("dominator.cli.certs:certs",
                  "Make a CA and issue certificates (identity = subject CN, methods = globs)."),
    "db": Lazy("dominator.cli.db:db",
               "Database schemas: where each database stands, and upgrading them."),
    "deploy": Lazy("dominator.cli.deploy:deploy",
                   "Roll images out in waves with health gates (the pipeline deploy stage)."),
    "fleet": Lazy("dominator.cli.fleet:fleet",
                  "The fleet as the running dominator sees it, and its safety switches."),
    "image": Lazy("dominator.cli.image:image",
                  "Images: immutable trees (plus filter, triggers, computed files) on the "
                  "image server."),
    "keys": Lazy("dominator.cli.keys:keys",
                 "Signing keys: `image add --sign-key DIR/NAME.key` signs an image, `subd` and "
                 "`dominator serve --trusted-keys DIR` trust the folder's *.pub keys."),
    "mdb": Lazy("dominator.cli.mdb:mdb", "The machine database: which image each host must run."),
    "quickstart": Lazy("dominator.cli.quickstart:quickstart",
                       "Bring up a working fleet on this machine and show it converge."),
    "serve": Lazy("dominator.cli.serve:serve_command",
                  "Run the dominator: keep every sub of the MDB on its required image."),
    "sub": Lazy("dominator.cli.sub:sub",
                "One host's subd, directly: poll, diff, fetch, update, push-image, get-file, "
                "config."),
    "tokens": Lazy("dominator.cli.tokens:tokens",
                   "Bearer tokens of the HTTP API: `read` may follow deploys, `deploy` may also "
                   "start and cancel them."),
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings=CONTEXT_SETTINGS,
             epilog=EXIT_CODES_HELP)
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
