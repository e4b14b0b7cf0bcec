"""The built wheel installs only our own top-level packages, so it lives side by side
with proto-plus (whose import name is `proto`) in one virtualenv, and both import.

The wheel is built from a copy of the working tree (never in place: setuptools'
`build/` keeps stale files from earlier builds and would put them in the wheel).
The fresh virtualenv is a plain one: the wheel and proto-plus are installed into
it; the third-party libraries both need are taken from this interpreter's
site-packages through a `.pth` line added after installing, placed behind the
virtualenv's own folder, so nothing of ours or of proto-plus can come from there.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from fleetlib.testing.daemons import PROJECT

OURS = {"fleetlib", "imageserver", "subd", "mdb", "dominator"}
NEVER = {"proto", "rpc", "fstree", "tests", "bench"}
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                     ".hypothesis", ".pytest_cache", ".ruff_cache", "results")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]

# Run in the new virtualenv: proto-plus works (a message class of its own) next to
# our generated modules and the CLI, and each module says where it came from.
PROBE = """
import importlib, json, sys
import proto

class Probe(proto.Message):
    number = proto.Field(proto.INT32, number=1)

assert Probe(number=7).number == 7
names = ["proto", "fleetlib.wire.tree_pb2", "fleetlib.wire.subd_pb2",
         "fleetlib.wire.subd_pb2_grpc", "fleetlib.wire.imageserver_pb2_grpc",
         "fleetlib.wire.dominator_pb2_grpc", "fleetlib.wire.codec", "fleetlib.fstree.tree",
         "imageserver.main", "subd.main", "mdb.store", "dominator.server.daemon",
         "dominator.cli.main"]
files = {name: importlib.import_module(name).__file__ for name in names}
# The schema's revisions and Alembic's env.py come with the wheel: a new MDB opens at head.
from mdb.store import HISTORY, Mdb
with Mdb("mdb.sqlite") as store:
    assert store.schema_revision == HISTORY.head(), store.schema_revision
files["mdb.revisions"] = str(HISTORY.directory / "__init__.py")
json.dump(files, sys.stdout)
"""


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


def build_wheel(tmp_path: Path) -> Path:
    """The project's wheel, built offline with this interpreter's setuptools."""
    source = tmp_path / "source"
    shutil.copytree(PROJECT, source, ignore=NOT_SOURCES, symlinks=True)
    out = tmp_path / "dist"
    done = run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                str(source)])
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("fleet_dominator-*.whl")
    return wheel


def test_wheel_installs_beside_proto_plus(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        tops = {name.split("/")[0] for name in names if ".dist-info/" not in name}
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        listed = set(archive.read(top_level).decode().split())
    assert tops == OURS, f"top-level names in the wheel: {sorted(tops)}"
    assert listed == OURS, f"top_level.txt: {sorted(listed)}"
    assert not (tops | listed) & NEVER
    assert any(n.startswith("dominator/") and "/templates/" in n and n.endswith(".html")
               for n in names), "the dashboard's templates are missing from the wheel"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    into_env = [*PIP, "--python", str(python), "install", "--no-deps", "-q"]
    done = run([*into_env, "--no-index", str(wheel)])
    assert done.returncode == 0, done.stdout + done.stderr
    done = run([*into_env, "--timeout", "20", "--retries", "1", "proto-plus"])
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        pytest.skip(f"proto-plus could not be installed (no package index?): {lines[-1]}")

    own_site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                         "'purelib'))"]).stdout.strip())
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (own_site / "zz_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))

    done = run([str(python), "-I", "-c", PROBE], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    files = json.loads(done.stdout)
    outside = {name: path for name, path in files.items()
               if not Path(path).resolve().is_relative_to(own_site.resolve())}
    assert not outside, f"imported from outside the new virtualenv: {outside}"
    assert Path(files["proto"]).parent.name == "proto"
    assert run([str(env_dir / "bin" / "dominator"), "--help"]).returncode == 0
