"""Synthetic root trees that exercise every inode kind and odd corner docs/DESIGN.md names."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SETCAP = shutil.which("setcap")


def make_tree(root: Path, big_file_bytes: int = 0) -> Path:
    """Fill `root` with hard links, symlinks, a device node, a fifo, setuid bits, a
    file capability and other xattrs, odd names (spaces, non-UTF-8 bytes), empty
    files, foreign owners and optionally one big file. Returns `root`."""
    (root / "etc" / "ssl").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "var" / "lib").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("golden\n")
    (root / "etc" / "ssl" / "cert.pem").write_bytes(os.urandom(3000))
    passwd = root / "usr" / "bin" / "passwd"
    passwd.write_bytes(b"\x7fELF" + os.urandom(20000))
    passwd.chmod(0o4755)
    ping = root / "usr" / "bin" / "ping"
    ping.write_bytes(b"\x7fELF" + os.urandom(5000))
    ping.chmod(0o755)
    if SETCAP:
        subprocess.run([SETCAP, "cap_net_raw+ep", str(ping)], check=True)
    else:
        os.setxattr(ping, "security.capability",
                    bytes.fromhex("0000000200200000000000000000000000000000"))
    os.setxattr(root / "etc" / "hostname", "user.origin", b"test\x00\xff")
    os.link(passwd, root / "usr" / "bin" / "chfn")  # a hard link pair
    (root / "usr" / "bin" / "vi").symlink_to("vim.basic")
    (root / "bin").symlink_to("usr/bin")
    os.mknod(root / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(root / "dev" / "sda", 0o660 | 0o060000, os.makedev(8, 0))
    (root / "dev" / "null").chmod(0o666)  # mknod obeys the umask
    os.mkfifo(root / "dev" / "initctl", 0o600)
    (root / "etc" / "with space.conf").write_text("a = b\n")
    odd = os.path.join(os.fsencode(root / "etc"), b"caf\xe9-latin1")
    with open(odd, "wb") as f:
        f.write(b"non-UTF-8 name\n")
    (root / "etc" / "empty").write_bytes(b"")
    (root / "var" / "lib" / "empty-too").write_bytes(b"")
    owned = root / "var" / "lib" / "app.db"
    owned.write_bytes(os.urandom(10000))
    os.chown(owned, 1234, 5678)
    os.chown(root / "var" / "lib", 1234, 5678)
    (root / "var" / "lib").chmod(0o750)
    os.utime(root / "etc" / "hostname", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    if big_file_bytes:
        with open(root / "var" / "lib" / "big.img", "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(big_file_bytes >> 20):
                f.write(chunk)
    return root


def rsync_differences(source: Path, dest: Path, *excludes: str) -> str:
    """What rsync would change to make `dest` equal `source` (empty when equal):
    contents, owners, modes, mtimes, hard links, xattrs, devices."""
    args = ["rsync", "-naHAXOJ", "--checksum", "--numeric-ids", "--delete",
            "--itemize-changes"]
    args += [f"--exclude={pattern}" for pattern in excludes]
    result = subprocess.run([*args, f"{source}/", f"{dest}/"], capture_output=True, check=True)
    return result.stdout.decode(errors="replace")
