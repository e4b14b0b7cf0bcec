"""The committed gRPC modules must match proto/*.proto (run `make proto`)."""

from __future__ import annotations

from pathlib import Path

from fleetlib.wire.generate import PACKAGE_PATH, WIRE_DIR, generate


def test_generated_modules_are_current(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = sorted((tmp_path / PACKAGE_PATH).glob("*_pb2*.py*"))
    assert fresh, "protoc produced nothing"
    committed = sorted(WIRE_DIR.glob("*_pb2*.py*"))
    assert [p.name for p in fresh] == [p.name for p in committed]
    stale = [p.name for p in fresh if p.read_bytes() != (WIRE_DIR / p.name).read_bytes()]
    assert not stale, f"stale generated modules {stale}: run `make proto` and commit"
