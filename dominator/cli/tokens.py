"""`dominator tokens ...`: named, scoped bearer tokens of the HTTP API, through the
running dominator (only their SHA-256 is kept there)."""

from __future__ import annotations

import click

from dominator.cli.options import dominator_option, json_option
from dominator.client import DominatorClient
from dominator.herd.tokens import SCOPES, ApiToken
from fleetlib.cli.display import ago, echo_json, echo_table
from fleetlib.cli.options import security_options
from fleetlib.rpc.tls import Security


@click.group(name="tokens")
def tokens() -> None:
    """Bearer tokens of the HTTP API: `read` may follow deploys, `deploy` may also
    start and cancel them. The default admin token (the state dir's http-token or
    `serve --token`) keeps every right."""


@tokens.command(name="create")
@click.argument("name")
@click.option("--scope", required=True, type=click.Choice(SCOPES),
              help="read: GET /v1/deploys...; deploy: also start and cancel deploys.")
@json_option
@dominator_option
@security_options
def create_command(name: str, scope: str, as_json: bool, dominator: str,
                   security: Security) -> None:
    """Make token NAME and print its value, this once: only its hash is kept."""
    with DominatorClient(dominator, security) as client:
        token, value = client.create_token(name, scope)
    if as_json:
        echo_json({**token.to_json(), "token": value})
        return
    click.echo(value)
    click.echo(f"token {token.name} (scope {token.scope}) created: keep its value now, "
               "it is never shown again", err=True)


@tokens.command(name="list")
@json_option
@dominator_option
@security_options
def list_command(as_json: bool, dominator: str, security: Security) -> None:
    """Every token: name, scope, created, last used, revoked (never a value)."""
    with DominatorClient(dominator, security) as client:
        found = client.list_tokens()
    if as_json:
        echo_json([token.to_json() for token in found])
        return
    echo_table(("name", "scope", "created", "by", "last used", "state"),
               [(token.name, token.scope, ago(token.created_unix), token.created_by,
                 ago(token.last_used_unix), _state(token)) for token in found])


def _state(token: ApiToken) -> str:
    if not token.revoked_unix:
        return "in force"
    return f"revoked {ago(token.revoked_unix)} by {token.revoked_by}"


@tokens.command(name="revoke")
@click.argument("name")
@dominator_option
@security_options
def revoke_command(name: str, dominator: str, security: Security) -> None:
    """Refuse token NAME from now on (401); its record stays, its name is never reused."""
    with DominatorClient(dominator, security) as client:
        token = client.revoke_token(name)
    click.echo(f"revoked token {token.name} (scope {token.scope})")
