"""Human-readable figures and progress bars shared by the CLI commands."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def echo_json(data: object) -> None:
    """Print machine-readable output for --json."""
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A byte-counting progress bar on stderr, safe to advance from several threads;
    it draws only on a terminal."""
    if not sys.stderr.isatty():
        yield lambda count: None
        return
    lock = threading.Lock()
    with click.progressbar(length=max(total, 1), label=label, file=sys.stderr,
                           show_pos=False, show_percent=True, show_eta=True) as bar:
        def advance(count: int) -> None:
            with lock:
                bar.update(count)
        yield advance
