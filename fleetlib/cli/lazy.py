"""Click groups whose subcommands are imported only when one of them runs: a command
loads its own module and what that imports, nothing of its siblings', and `--help`
lists them all from a line held in the group, importing none."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import click


@dataclass(frozen=True)
class Lazy:
    """A subcommand not yet imported: where it is ("module:attribute") and the first
    sentence of its help, which is all `--help` lists of it (tests/unit/test_cli_imports.py
    checks that the listing is the one the imported commands give)."""

    target: str
    summary: str


class LazyGroup(click.Group):
    """A click group of `Lazy` subcommands (and any added the usual way)."""

    def __init__(self, *args: Any, lazy: Mapping[str, Lazy], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = self.lazy[cmd_name].target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command), self.lazy[cmd_name].target
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing (3 spaces of padding, help shortened to fit), each lazy
        subcommand standing in as a command holding only its summary."""
        commands = [(name, click.Command(name, help=self.lazy[name].summary)
                     if name in self.lazy else self.commands[name])
                    for name in self.list_commands(ctx)]
        commands = [(name, command) for name, command in commands if not command.hidden]
        if commands:
            limit = formatter.width - 6 - max(len(name) for name, _ in commands)
            with formatter.section("Commands"):
                formatter.write_dl([(name, command.get_short_help_str(limit))
                                    for name, command in commands])
