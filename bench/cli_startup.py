"""Issue 13's figure: how long a `dominator` command takes to start, against `python -c
pass` (the interpreter's own start) in the same run. Measured, as an operator runs them
(the console script next to this interpreter): `dominator --help`, `dominator --version`,
`dominator image --help` and `dominator image list` against a running image server
(mutual TLS, identities from `certs init`, one small image on it), and two floors:
`python -c 'import grpc'` (any command that calls a server) and a bare gRPC ListImages
(the generated stub, nothing checked: the least `image list` can do). Each command runs
`--runs` times, interleaved with the others so that the machine's load falls on all
alike; medians of the wall clock and of the child's CPU (user + system). Goal: every
command under 150 ms wall.

`python -m bench.cli_startup [--runs 11] [--module] [--json]`
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from bench.timing import RESULTS
from fleetlib.rpc.certs import init_ca
from fleetlib.testing.daemons import PROJECT, cli, imageserver_daemon

GOAL_MS = 150.0
NAME = "cli_startup"
PEER = "python -c pass"
# What any command calling a server pays at least, and the least `image list` can do:
# the generated stub's ListImages over mutual TLS, nothing checked, one line printed.
FLOORS = {
    "python -c 'import grpc'": "import grpc",
    "bare grpc ListImages": """
import os
import grpc
from fleetlib.wire import imageserver_pb2, imageserver_pb2_grpc
tls = os.environ["DOMINATOR_TLS_DIR"]
ca, cert, key = (open(os.path.join(tls, n), "rb").read() for n in ("ca.pem", "cert.pem", "key.pem"))
credentials = grpc.ssl_channel_credentials(ca, key, cert)
with grpc.secure_channel(os.environ["DOMINATOR_IMAGESERVER"], credentials,
                         options=[("grpc.ssl_target_name_override", "imageserver")]) as channel:
    reply = imageserver_pb2_grpc.ImageServerStub(channel).ListImages(
        imageserver_pb2.ListImagesRequest(), timeout=30)
print(len(reply.images))
""",
}


def dominator_program(module: bool) -> list[str]:
    """The `dominator` console script of this interpreter's environment, or (MODULE, or
    no script) `python -m dominator.cli` run in this checkout."""
    script = Path(sys.executable).with_name("dominator")
    if module or not script.exists():
        return [sys.executable, "-m", "dominator.cli"]
    return [str(script)]


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of `argv`, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, cwd=PROJECT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def measure(commands: dict[str, list[str]], env: dict[str, str],
            runs: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU milliseconds of each command over `runs` interleaved rounds
    (after one untimed round that warms the page cache), and its fastest wall time (on
    a busy machine, the nearest to what it takes alone)."""
    times: dict[str, list[tuple[float, float]]] = {what: [] for what in commands}
    for round_ in range(runs + 1):
        for what, argv in commands.items():
            wall, cpu = run_once(argv, env)
            if round_:
                times[what].append((wall, cpu))
    return {what: {"wall_ms": round(statistics.median(w for w, _ in got) * 1000, 1),
                   "cpu_ms": round(statistics.median(c for _, c in got) * 1000, 1),
                   "fastest_wall_ms": round(min(w for w, _ in got) * 1000, 1)}
            for what, got in times.items()}


def rows(figures: dict[str, dict[str, float]]) -> list[dict[str, object]]:
    """One row per command: its medians, the ratio to the peer's wall, the goal (none
    for the floors, which are there to compare with)."""
    base = figures[PEER]["wall_ms"]
    return [{"what": what, **figure, "peer": PEER, "peer_wall_ms": base,
             "ratio": round(figure["wall_ms"] / base, 2),
             "goal_ms": None if what in FLOORS else GOAL_MS,
             "met": None if what in FLOORS else figure["wall_ms"] < GOAL_MS}
            for what, figure in figures.items() if what != PEER]


def run(work: Path, runs: int, module: bool) -> dict[str, object]:
    """Start an image server holding one image, measure, stop it."""
    init_ca(work / "ca")
    # Bytecode is cached, as for an installed program (pip compiles it), in a folder of
    # our own: the checkout stays clean, and PYTHONDONTWRITEBYTECODE (set here) would
    # have every run compile the project's modules again (~60 ms).
    env = {**os.environ, "DOMINATOR_TLS_DIR": str(work / "ca/admin"),
           "PYTHONPYCACHEPREFIX": str(work / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("bench\n")
    server = imageserver_daemon(work / "state", work / "ca", work / "imageserver.log").start()
    try:
        env["DOMINATOR_IMAGESERVER"] = server.address
        cli("image", "add", "small", str(tree), env=env, check=True)
        dominator = dominator_program(module)
        commands = {
            PEER: [sys.executable, "-c", "pass"],
            **{what: [sys.executable, "-c", code] for what, code in FLOORS.items()},
            "dominator --help": [*dominator, "--help"],
            "dominator --version": [*dominator, "--version"],
            "dominator image --help": [*dominator, "image", "--help"],
            "dominator image list": [*dominator, "image", "list"],
        }
        figures = measure(commands, env, runs)
    finally:
        server.stop()
    return {"runs": runs, "program": dominator, "rows": rows(figures),
            "peer": {"what": PEER, **figures[PEER]}}


def show(result: dict[str, object]) -> None:
    """The table on stdout."""
    peer = result["peer"]
    assert isinstance(peer, dict)
    print(f"\n{NAME} (medians of {result['runs']}; {peer['what']}: "
          f"{peer['wall_ms']:.1f} ms wall, fastest {peer['fastest_wall_ms']:.1f}, "
          f"{peer['cpu_ms']:.1f} ms CPU)")
    print(f"{'what':26} {'wall ms':>8} {'fastest':>8} {'cpu ms':>8} {'ratio':>6} {'goal ms':>8}")
    rows_ = result["rows"]
    assert isinstance(rows_, list)
    for row in rows_:
        goal, mark = ("-", "(floor)") if row["met"] is None else \
            (f"{row['goal_ms']:.0f}", "ok" if row["met"] else "MISSED")
        print(f"{row['what']:26} {row['wall_ms']:8.1f} {row['fastest_wall_ms']:8.1f} "
              f"{row['cpu_ms']:8.1f} "
              f"{row['ratio']:6.2f} {goal:>8} {mark}")


@click.command()
@click.option("--runs", default=11, show_default=True, type=click.IntRange(min=3),
              help="Timed runs of each command; medians are reported.")
@click.option("--module", is_flag=True,
              help="Run `python -m dominator.cli` from this checkout, not the console "
                   "script (to compare two checkouts: run each one's bench with it).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def main(runs: int, module: bool, as_json: bool) -> None:
    """`dominator` start-up times against `python -c pass`."""
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as work:
        result = run(Path(work), runs, module)
    figures = json.dumps(result, indent=2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(figures)
    if as_json:
        click.echo(figures)
    else:
        show(result)


if __name__ == "__main__":
    main()
