"""Filtered content inside a directory the image lacks (issue: with Dominator's own
Debian filter, a host holding DHCP leases under a /var/lib/dhcp that the image does
not have could never converge). The directory and its filtered content stay, the
rest converges, and nothing filtered is ever deleted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fleetlib.testing.daemons import Daemon, cli

# Lines of Dominator's own filter for Debian hosts.
DEBIAN_FILTER = [r"/var/lib/dhcp/.*", r"/etc/udev/rules[.]d/.*", r"/etc/ssh/ssh_host_.*"]


def test_host_keeps_filtered_leases_under_a_directory_the_image_lacks(
        tmp_path: Path, cli_env: dict[str, str], start_subd: Callable[..., Daemon]) -> None:
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    (image / "etc/motd").write_text("image motd\n")
    (image / "var/lib").mkdir(parents=True)
    filter_file = tmp_path / "filter"
    filter_file.write_text("\n".join(DEBIAN_FILTER) + "\n")
    cli("image", "add", "debian", str(image), "--filter", str(filter_file), env=cli_env,
        check=True)

    root = tmp_path / "host"
    (root / "var/lib/dhcp").mkdir(parents=True)
    (root / "var/lib/dhcp/dhclient.eth0.leases").write_text("lease 10.0.0.7\n")
    (root / "etc/udev/rules.d").mkdir(parents=True)
    (root / "etc/udev/rules.d/70-persistent-net.rules").write_text("rule\n")
    (root / "etc/motd").write_text("hand-made motd\n")
    (root / "srv/stale").mkdir(parents=True)
    (root / "srv/stale/file").write_text("not in the image\n")
    sub = start_subd(root)

    pushed = cli("sub", "push-image", sub.address, "debian", env=cli_env)
    assert pushed.returncode == 0, pushed.stderr
    assert (root / "etc/motd").read_text() == "image motd\n"  # the rest converged
    assert not (root / "srv").exists()  # and what the image lacks, unfiltered, went
    assert (root / "var/lib/dhcp/dhclient.eth0.leases").read_text() == "lease 10.0.0.7\n"
    assert (root / "etc/udev/rules.d/70-persistent-net.rules").read_text() == "rule\n"

    again = cli("sub", "diff", sub.address, "debian", "--json", env=cli_env)
    assert again.returncode == 0, again.stdout + again.stderr  # converged: no difference
