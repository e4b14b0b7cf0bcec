"""Human-readable figures, tables, times and progress bars shared by the CLI commands.

JSON output (`--json`) uses one key style everywhere: snake_case keys, and a point in
time as `<what>_unix`, integer seconds since the epoch (0 for never).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import click

TIME_UNITS = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def ago(unix: float, now: float | None = None) -> str:
    """A point in time as people say it: 'just now', '2 min ago', 'in 3 h', '-' for never."""
    if not unix:
        return "-"
    delta = (time.time() if now is None else now) - unix
    size = abs(delta)
    if size < 10:
        return "just now"
    # The largest unit the time rounds up to, then the nearest whole number of it: a
    # pause of 1 h set a moment ago reads "in 1 h", not "in 59 min".
    unit, seconds = next((unit, seconds) for (unit, seconds), smaller
                         in zip(TIME_UNITS, (*TIME_UNITS[1:], ("", 0)), strict=True)
                         if size + smaller[1] / 2 >= seconds)
    text = f"{int(size / seconds + 0.5)} {unit}"
    return f"{text} ago" if delta > 0 else f"in {text}"


def utc(unix: float) -> str:
    """A point in time as a UTC date and time: '2026-01-02 03:04:05 UTC'."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows under upper-case headers, columns padded to their widest cell (kubectl style);
    an empty cell shows '-'."""
    cells = [[str(h).upper() for h in headers]]
    cells += [["-" if value is None or value == "" else str(value) for value in row]
              for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells)


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print `table(headers, rows)`."""
    click.echo(table(headers, rows))


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
