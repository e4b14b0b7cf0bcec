"""Timing helpers: warm runs, medians, and a result table with ratios."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def timed(action: Callable[[], object], runs: int = 3,
          reset: Callable[[], object] | None = None) -> float:
    """Median wall time of `action` over `runs`, calling `reset` (untimed) before each."""
    times = []
    for _ in range(runs):
        if reset is not None:
            reset()
        subprocess.run(["sync"], check=True)  # write-back of earlier runs must not be billed
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def paired(ours: Callable[[], object], peer: Callable[[], object], runs: int = 3,
           reset_ours: Callable[[], object] | None = None,
           reset_peer: Callable[[], object] | None = None) -> tuple[float, float]:
    """Median wall times of `ours` and `peer`, run in turns (peer, ours, peer, ...) so
    that a change in the machine's load falls on both; resets are untimed."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for action, reset, into in ((peer, reset_peer, times[1]), (ours, reset_ours, times[0])):
            into.append(timed(action, 1, reset))
    return statistics.median(times[0]), statistics.median(times[1])


def shell(command: str) -> Callable[[], None]:
    """An action that runs a shell pipeline and checks it succeeded."""
    return lambda: subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True,
                                  stdout=subprocess.DEVNULL)


def fresh_dir(path: Path) -> Callable[[], None]:
    """A reset that empties `path`."""
    def reset() -> None:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    return reset


@dataclass
class Report:
    """Rows of (what, ours, peer, goal) printed as a table and saved as JSON."""

    name: str
    rows: list[dict] = field(default_factory=list)

    def add(self, what: str, ours: float, peer_name: str, peer: float, goal: float,
            unit: str = "s") -> None:
        """One comparison; ratio = ours / peer, goal is the largest acceptable ratio."""
        ratio = ours / peer if peer else float("inf")
        self.rows.append({"what": what, "ours": round(ours, 3), "peer": peer_name,
                          "peer_value": round(peer, 3), "unit": unit, "ratio": round(ratio, 2),
                          "goal": goal, "met": ratio <= goal})

    def print(self) -> None:
        """The table, and a JSON copy in bench/results/."""
        print(f"\n{self.name}")
        print(f"{'what':42} {'ours':>8} {'peer':>34} {'ratio':>6} {'goal':>6}")
        for row in self.rows:
            unit = row["unit"]
            peer = f"{row['peer']} {row['peer_value']:.3f}{unit}"
            mark = "ok" if row["met"] else "MISSED"
            print(f"{row['what']:42} {row['ours']:7.3f}{unit:<2} {peer:>34} "
                  f"{row['ratio']:6.2f} {row['goal']:6.2f} {mark}")
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{self.name}.json").write_text(json.dumps(self.rows, indent=2))
