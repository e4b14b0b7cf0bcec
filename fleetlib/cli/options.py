"""Click options every program shares: the TLS identity (or --insecure) and server
addresses, so each daemon and CLI command spells them the same way."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import click

from fleetlib.cli.endpoints import check_not_url, origin_of, remember, remember_security
from fleetlib.errors import FleetError
from fleetlib.rpc.tls import Security

DURATION_RE = re.compile(r"^(\d+)([smhd]?)$")
SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'90', '30m', '12h', '7d' -> seconds."""
    match = DURATION_RE.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise FleetError(f"invalid duration {text!r}: use e.g. 3600, 30m, 12h or 7d")
    return int(match.group(1)) * SECONDS[match.group(2)]


class Duration(click.ParamType[int]):
    """A click option value such as 90, 30m, 12h or 7d, as seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_duration(str(value))
        except FleetError as err:
            self.fail(str(err), param, ctx)


def security_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --tls-dir/--insecure to a click command, handing it one `security` argument.

    Apply below @click.command. The identity is loaded when the command runs, so a
    missing or bad folder is a one-line FleetError, and --help never needs one.
    """

    @click.option(
        "--tls-dir",
        envvar="DOMINATOR_TLS_DIR",
        type=click.Path(file_okay=False, path_type=str),
        show_envvar=True,
        help="Identity folder holding ca.pem, cert.pem and key.pem (see `dominator certs`).",
    )
    @click.option(
        "--insecure",
        is_flag=True,
        help="Turn TLS off: no encryption, no authentication. Development only.",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, tls_dir: str | None, insecure: bool, **kwargs: Any) -> Any:
        remember_security(insecure)
        return func(*args, security=Security.from_options(tls_dir, insecure), **kwargs)

    return wrapper


def address_option(
    name: str, envvar: str, default: str, help: str, multiple: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A `--NAME HOST:PORT` option read from ENVVAR when not given, defaulting to DEFAULT
    (with `multiple`: repeatable, a tuple in the order given; ENVVAR splits on spaces).

    NAME is the server's role; the value and where it came from are remembered, so a
    failed connection can say which setting to change."""

    def record(ctx: click.Context, param: click.Parameter,
               value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        origin = origin_of(f"--{name}", envvar, ctx.get_parameter_source(param.name or name))
        for address in (value,) if isinstance(value, str) else value:
            check_not_url(address)
            remember(name, address, origin)
        return value

    return click.option(
        f"--{name}",
        envvar=envvar,
        multiple=multiple,
        default=(default,) if multiple else default,
        show_default=True,
        show_envvar=True,
        metavar="HOST:PORT",
        help=help,
        callback=record,
    )
