"""Command-line plumbing shared by every program: error handling and common options.

Every program reports bad input as one line on stderr and a non-zero exit
(2, so that `image diff` can keep 1 for "differ"), never as a traceback.
"""

from __future__ import annotations

import logging
import sys

import click
import grpc

from fleetlib.errors import FleetError
from fleetlib.rpc.status import describe_rpc_error

log = logging.getLogger(__name__)

EXIT_ERROR = 2


def run(command: click.Command) -> None:
    """Run a click command, turning every expected failure into a one-line error."""
    try:
        command.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.UsageError as err:
        hint = f" (see '{err.ctx.command_path} --help')" if err.ctx else ""
        click.echo(f"error: {err.format_message()}{hint}", err=True)
        sys.exit(EXIT_ERROR)
    except click.ClickException as err:
        click.echo(f"error: {err.format_message()}", err=True)
        sys.exit(EXIT_ERROR)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_ERROR)
    except FleetError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_ERROR)
    except grpc.RpcError as err:
        click.echo(f"error: {describe_rpc_error(err)}", err=True)
        sys.exit(EXIT_ERROR)
    except OSError as err:
        click.echo(f"error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def setup_logging(verbose: bool) -> None:
    """Log to stderr: INFO for daemons by default, DEBUG with --verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
