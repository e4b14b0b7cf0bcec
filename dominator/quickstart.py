"""`dominator quickstart`: the embedded default, a working system in one command.

Today it makes certificates, starts an image server on a state directory,
builds and adds a sample image, lists and shows it, prints the `export` lines
that point the CLI at it, and keeps running until interrupted. Later work adds
the dominator, an MDB and subs on local folders.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fstree.errors import FleetError
from rpc.certs import init_ca
from rpc.tls import Security, open_channel

log = logging.getLogger(__name__)

SAMPLE_TRIGGERS = [{"MatchLines": ["/etc/nginx/.*"], "Service": "nginx", "DoReload": True}]


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
    (root / "etc/hostname").write_text("template\n")


def wait_serving(address: str, security: Security, role: str, process: subprocess.Popen,
                 timeout: float = 30.0) -> None:
    """Wait for a started daemon's health check; FleetError if it died or hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FleetError(f"{role} exited with status {process.returncode}")
        channel = open_channel(address, security, role)
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            time.sleep(0.2)
        finally:
            channel.close()
    raise FleetError(f"{role} did not become healthy within {timeout:.0f} s")


def run_step(env: dict[str, str], *args: str) -> str:
    """Run one `dominator` command as a user would, echoing it and its output."""
    click.secho(f"$ dominator {' '.join(args)}", fg="cyan", err=True)
    result = subprocess.run([sys.executable, "-m", "dominator.cli", *args], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise FleetError(f"`dominator {' '.join(args)}` failed: {result.stderr.strip()}")
    click.echo(result.stdout, nl=False, err=True)
    return result.stdout


def wait_for_interrupt() -> None:
    """Block until SIGINT or SIGTERM, even where a shell started us with them ignored."""
    stop = {signal.SIGINT, signal.SIGTERM}
    for signum in stop:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # after the children: they inherit masks
    signal.sigwait(stop)


@click.command(name="quickstart")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where everything lives (default: a new temporary folder).")
@click.option("--imageserver-port", default=6971, show_default=True,
              type=click.IntRange(1, 65535), help="Port of the image server.")
def quickstart(state_dir: Path | None, imageserver_port: int) -> None:
    """Bring up a working system on this machine and show it converge.

    Makes a CA, starts an image server, adds a sample image and shows it, then
    prints the `export` lines that point the CLI at it. Runs until Ctrl-C and
    stops everything it started.
    """
    state = state_dir or Path(tempfile.mkdtemp(prefix="dominator-quickstart-"))
    state.mkdir(parents=True, exist_ok=True)
    tls = state / "tls"
    if not (tls / "ca.key").exists():
        init_ca(tls)
    click.echo(f"state directory: {state}", err=True)
    address = f"localhost:{imageserver_port}"
    admin = Security.from_options(str(tls / "admin"), insecure=False)
    env = {**os.environ, "DOMINATOR_TLS_DIR": str(tls / "admin"),
           "DOMINATOR_IMAGESERVER": address}
    server_log = open(state / "imageserver.log", "ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "imageserver.main", "--state-dir", str(state / "imageserver"),
         "--port", str(imageserver_port), "--tls-dir", str(tls / "imageserver")],
        stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_serving(address, admin, "imageserver", server)
        click.echo(f"image server up on {address} (log: {state / 'imageserver.log'})", err=True)
        sample = state / "sample-root"
        build_sample_root(sample)
        (state / "sample-triggers.json").write_text(json.dumps(SAMPLE_TRIGGERS, indent=2))
        name = f"sample/{time.strftime('%Y%m%d-%H%M%S')}"
        run_step(env, "image", "add", name, str(sample), "--triggers",
                 str(state / "sample-triggers.json"))
        run_step(env, "image", "list")
        run_step(env, "image", "show", name)
        click.echo("\nPoint the CLI at this system:", err=True)
        click.echo(f"export DOMINATOR_TLS_DIR={tls / 'admin'}")
        click.echo(f"export DOMINATOR_IMAGESERVER={address}")
        click.echo("\nRunning until Ctrl-C; then every process started here stops.", err=True)
        sys.stdout.flush()
        wait_for_interrupt()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()
        click.echo("stopped", err=True)
