"""Command-line plumbing shared by every program: exit codes, one-line errors, --version
and logging.

Exit codes a script can act on, the same for every command:
0 success, 1 a negative answer (differs, not found, a deploy ended TERMINAL), 2 usage or
bad input, 3 unavailable (worth retrying), 4 refused by a safety rule or precondition.
Every expected failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from fleetlib.errors import (
    ExistsError,
    FleetError,
    NoSpaceError,
    NotFoundError,
    PreconditionError,
    UnavailableError,
)

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_REFUSED = 4
EXIT_ERROR = EXIT_USAGE

EXIT_CODES_HELP = (
    "Exit codes: 0 success, 1 a negative answer (differs, not found, deploy TERMINAL), "
    "2 usage or bad input, 3 unavailable (retry), 4 refused by a safety rule or precondition."
)

PACKAGE = "fleet-dominator"

# By grpc.StatusCode name: this module loads no grpc (`--help` must not pay for it).
_GRPC_EXITS = {
    "NOT_FOUND": EXIT_NEGATIVE,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "DEADLINE_EXCEEDED": EXIT_UNAVAILABLE,
    "RESOURCE_EXHAUSTED": EXIT_UNAVAILABLE,
    "ABORTED": EXIT_UNAVAILABLE,
    "FAILED_PRECONDITION": EXIT_REFUSED,
    "ALREADY_EXISTS": EXIT_REFUSED,
    "PERMISSION_DENIED": EXIT_REFUSED,
    "UNAUTHENTICATED": EXIT_REFUSED,
}


def exit_code_for(err: FleetError) -> int:
    """The exit code a FleetError kind stands for."""
    if isinstance(err, NotFoundError):
        return EXIT_NEGATIVE
    if isinstance(err, UnavailableError | NoSpaceError):
        return EXIT_UNAVAILABLE
    if isinstance(err, PreconditionError | ExistsError):
        return EXIT_REFUSED
    return EXIT_USAGE


def rpc_exit_code(err: grpc.RpcError) -> int:
    """The exit code a failed RPC's status stands for."""
    code = err.code() if hasattr(err, "code") else None
    return _GRPC_EXITS.get(getattr(code, "name", ""), EXIT_USAGE)


def _rpc_errors() -> tuple[type[Exception], ...]:
    """What `run` catches as a failed RPC: grpc.RpcError once grpc is loaded, nothing
    before (only a loaded grpc raises one), so a command that never calls needs no grpc."""
    grpc_module = sys.modules.get("grpc")
    return (grpc_module.RpcError,) if grpc_module is not None else ()


def version() -> str:
    """This installation's version, from the package metadata."""
    import importlib.metadata  # here: ~20 ms at start-up that only --version needs

    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def version_option(prog: str) -> Callable[[Any], Any]:
    """`--version`: print `PROG VERSION` and exit 0 (the version is read only then)."""

    def show(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            click.echo(f"{prog} {version()}", color=ctx.color)
            ctx.exit()

    return click.option("--version", is_flag=True, expose_value=False, is_eager=True,
                        callback=show, help="Show the version and exit.")


CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "show_default": True}


def run(command: click.Command) -> None:
    """Run a click command, turning every expected failure into one line and an exit code."""
    try:
        command.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.NoArgsIsHelpError as err:
        # A group given no subcommand: its help is the answer, not an error.
        click.echo(err.ctx.get_help() if err.ctx else "")
        sys.exit(EXIT_OK)
    except click.UsageError as err:
        hint = f" (see '{err.ctx.command_path} --help')" if err.ctx else ""
        fail(f"{err.format_message()}{hint}", EXIT_USAGE)
    except click.ClickException as err:
        fail(err.format_message(), EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_USAGE)
    except FleetError as err:
        fail(str(err), exit_code_for(err))
    except _rpc_errors() as err:
        # Imported only now: both load grpc, which the command that failed has loaded.
        from fleetlib.cli.endpoints import explain
        from fleetlib.rpc.status import describe_rpc_error

        fail(explain(err) or describe_rpc_error(err), rpc_exit_code(err))
    except OSError as err:
        fail(f"{err.strerror or err}: {err.filename or ''}".rstrip(": "), EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def fail(message: str, code: int) -> None:
    """Print `error: MESSAGE` on stderr and exit with CODE."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def setup_logging(verbose: bool) -> None:
    """Log to stderr: INFO for daemons by default, DEBUG with --verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
