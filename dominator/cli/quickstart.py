"""`dominator quickstart`: the embedded default, a working fleet in one command.

In a state directory it makes certificates, starts an image server, a
dominator with a SQLite MDB and N subd on local folders, adds a sample image
with a computed file and a trigger, puts the hosts in the MDB, shows them
converge, edits a file on one host by hand and shows it corrected (and
reported as an intrusion), then prints the lines that point the CLI at this
fleet and runs until interrupted, stopping everything it started.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from dominator.server.daemon import api_token
from fleetlib.errors import FleetError
from fleetlib.rpc.certs import init_ca
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import Daemon, cli

SAMPLE_TRIGGERS = [{"MatchLines": ["/etc/nginx/.*"], "Service": "nginx", "DoReload": True}]
SAMPLE_COMPUTED = [{"Filename": "/etc/hostname", "Source": "hostname.j2"}]
HOSTNAME_TEMPLATE = "{{ hostname }}\n"
CONVERGE_TIMEOUT = 120.0
START_TIMEOUT = 30.0  # a daemon's wait until healthy


def build_sample_root(root: Path) -> None:
    """A small root filesystem to make the first image from."""
    for folder in ("etc/nginx", "usr/bin", "var/www"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "etc/motd").write_text("Managed by dominator: local changes will be reverted.\n")
    (root / "etc/nginx/nginx.conf").write_text("events {}\nhttp { server { listen 8080; } }\n")
    (root / "var/www/index.html").write_text("<h1>hello from the golden image</h1>\n")
    hello = root / "usr/bin/hello"
    hello.write_text("#!/bin/sh\necho hello from $(cat /etc/hostname)\n")
    hello.chmod(0o755)
    (root / "etc/hostname").write_text("rendered per host by the dominator\n")


def wait_for_interrupt() -> None:
    """Block until SIGINT or SIGTERM, even where a shell started us with them ignored."""
    stop = {signal.SIGINT, signal.SIGTERM}
    for signum in stop:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # after the children: they inherit masks
    signal.sigwait(stop)


@dataclass
class Fleet:
    """The daemons quickstart started (fleetlib.testing's launcher, as the tests and
    benchmarks use), and how to reach them."""

    state: Path
    admin: Security
    env: dict[str, str]
    daemons: list[Daemon] = field(default_factory=list)

    def start(self, name: str, role: str, port: int, module: str, *args: str) -> None:
        """Start `python -m MODULE ARGS... --port PORT` logging to STATE/NAME.log, in a
        session of its own; wait until healthy."""
        daemon = Daemon(module, list(args), role, port, self.admin, self.state / f"{name}.log",
                        new_session=True, start_timeout=START_TIMEOUT)
        self.daemons.append(daemon)
        daemon.start()
        click.echo(f"  {name} up on localhost:{port} (log: {self.state / name}.log)", err=True)

    def dominator(self, *args: str) -> str:
        """Run one `dominator` command as a user would; its output."""
        click.secho(f"$ dominator {' '.join(args)}", fg="cyan", err=True)
        result = cli(*args, env=self.env)
        if result.returncode != 0:
            raise FleetError(f"`dominator {' '.join(args)}` failed: {result.stderr.strip()}")
        return result.stdout

    def wait_until(self, done: Callable[[list[dict[str, Any]]], object],
                   what: str) -> list[dict[str, Any]]:
        """Show host statuses until `done(hosts)`; FleetError after the timeout."""
        deadline = time.monotonic() + CONVERGE_TIMEOUT
        shown = ""
        while time.monotonic() < deadline:
            hosts: list[dict[str, Any]] = json.loads(
                cli("fleet", "list", "--json", env=self.env).stdout or "[]")
            line = ", ".join(f"{h['hostname']}: {h['status']}" for h in hosts)
            if line != shown:
                click.echo(f"  {line}", err=True)
                shown = line
            if hosts and done(hosts):
                return hosts
            time.sleep(0.5)
        raise FleetError(f"timed out waiting until {what}")

    def stop(self) -> None:
        """Stop every daemon started, newest first."""
        for daemon in reversed(self.daemons):
            daemon.stop()


@click.command(name="quickstart")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where everything lives (default: a new temporary folder).")
@click.option("--subs", default=3, show_default=True, type=click.IntRange(1, 50),
              help="How many subd to run on local folders.")
@click.option("--base-port", default=6970, show_default=True, type=click.IntRange(1024, 60000),
              help="Dominator gRPC port; the image server takes +1, subd +100 and up.")
def quickstart(state_dir: Path | None, subs: int, base_port: int) -> None:
    """Bring up a working fleet on this machine and show it converge.

    Makes a CA, starts an image server, a dominator (SQLite MDB) and SUBS
    subd on local folders, adds a sample image with a computed file and a
    trigger, shows the hosts converge and a hand-made change reverted, then
    prints the `export` lines for the CLI. Runs until Ctrl-C and stops
    everything it started.
    """
    state = (state_dir or Path(tempfile.mkdtemp(prefix="dominator-quickstart-"))).resolve()
    state.mkdir(parents=True, exist_ok=True)
    tls = state / "tls"
    if not (tls / "ca.key").exists():
        init_ca(tls)
    dominator_address = f"localhost:{base_port}"
    imageserver_address = f"localhost:{base_port + 1}"
    (state / "dominator").mkdir(exist_ok=True)
    token = api_token(state / "dominator", None)  # serve reads it there: never in `ps`
    env = {**os.environ, "DOMINATOR_TLS_DIR": str(tls / "admin"),
           "DOMINATOR_IMAGESERVER": imageserver_address, "DOMINATOR_ADDRESS": dominator_address}
    fleet = Fleet(state, Security.from_options(str(tls / "admin"), insecure=False), env)
    click.echo(f"state directory: {state}\nstarting the fleet:", err=True)
    try:
        fleet.start("imageserver", "imageserver", base_port + 1, "imageserver.main",
                    "--state-dir", str(state / "imageserver"),
                    "--tls-dir", str(tls / "imageserver"))
        generators = state / "generators"
        generators.mkdir(exist_ok=True)
        (generators / "hostname.j2").write_text(HOSTNAME_TEMPLATE)
        fleet.start("dominator", "dominator", base_port, "dominator.cli", "serve",
                    "--state-dir", str(state / "dominator"), "--imageserver",
                    imageserver_address, "--generators", str(generators),
                    "--poll-interval", "1", "--http-port", str(base_port + 10),
                    "--tls-dir", str(tls / "dominator"))
        trigger_log = state / "triggers.log"
        for index in range(1, subs + 1):
            root = state / "subs" / f"host-{index}"
            root.mkdir(parents=True, exist_ok=True)
            port = base_port + 100 + index
            fleet.start(f"subd-{index}", "subd", port, "subd.main",
                        "--root", str(root), "--tls-dir", str(tls / "subd"),
                        "--background-cpu-percent", "20", "--trigger-command",
                        f"/bin/sh -c 'echo {{action}} {{service}} >> {trigger_log}'")
        sample = state / "sample-root"
        build_sample_root(sample)
        (state / "sample-triggers.json").write_text(json.dumps(SAMPLE_TRIGGERS, indent=2))
        (state / "sample-computed.json").write_text(json.dumps(SAMPLE_COMPUTED, indent=2))
        image = f"sample/{time.strftime('%Y%m%d-%H%M%S')}"
        click.echo(fleet.dominator("image", "add", image, str(sample), "--triggers",
                                   str(state / "sample-triggers.json"), "--computed-files",
                                   str(state / "sample-computed.json")), nl=False, err=True)
        for index in range(1, subs + 1):
            fleet.dominator("mdb", "set", f"host-{index}", "--address",
                            f"localhost:{base_port + 100 + index}", "--required-image", image)
        click.echo("converging:", err=True)
        fleet.wait_until(lambda hosts: all(h["status"] == "synced" for h in hosts),
                         "every host is synced")
        motd = state / "subs" / "host-1" / "etc" / "motd"
        click.echo(f"editing {motd} by hand, as an intruder would:", err=True)
        motd.write_text("pwned\n")
        fleet.wait_until(lambda hosts: hosts[0]["intrusion_paths"] and "pwned" not in
                         motd.read_text(), "host-1 is corrected")
        click.echo(f"  {motd} restored; host-1 reports an intrusion at /etc/motd "
                   "(`dominator fleet acknowledge host-1` clears it)", err=True)
        click.echo("\nThe fleet is running. Point the CLI at it:", err=True)
        click.echo(f"export DOMINATOR_TLS_DIR={tls / 'admin'}")
        click.echo(f"export DOMINATOR_ADDRESS={dominator_address}")
        click.echo(f"export DOMINATOR_IMAGESERVER={imageserver_address}")
        click.echo(f"export DOMINATOR_URL=http://localhost:{base_port + 10}")
        click.echo(f"export DOMINATOR_TOKEN={token}")
        click.echo(f"\nDashboard (open, read-only): http://localhost:{base_port + 10}/\n"
                   f"Deploy API: http://localhost:{base_port + 10}/v1/deploys (bearer token: "
                   f"{state / 'dominator' / 'http-token'})\nTry: dominator fleet list; "
                   "dominator mdb list; dominator sub poll localhost:"
                   f"{base_port + 101}\nRunning until Ctrl-C; then every process started here "
                   "stops.", err=True)
        sys.stdout.flush()
        wait_for_interrupt()
    finally:
        fleet.stop()
        click.echo("stopped", err=True)
