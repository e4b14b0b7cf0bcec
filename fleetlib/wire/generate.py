"""Regenerate the committed gRPC/protobuf modules of fleetlib/wire/ from proto/*.proto.

Run as `python -m fleetlib.wire.generate [OUTDIR]` (or `make proto`). The modules are
committed so that installing the project needs no protoc; a test regenerates them
into a temporary folder and fails if the committed ones are stale.

The sources live in proto/ but are compiled as if they stood in fleetlib/wire/ (a
protoc path mapping), so the generated modules import each other as
`fleetlib.wire.x_pb2` and no top-level `proto` package is ever installed.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

WIRE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = WIRE_DIR.parent.parent
PROTO_DIR = PROJECT_DIR / "proto"
PACKAGE_PATH = "fleetlib/wire"


def generate(out_dir: Path) -> None:
    """Compile every proto/*.proto into `out_dir`/fleetlib/wire/."""
    (out_dir / PACKAGE_PATH).mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    sources = sorted(f"{PACKAGE_PATH}/{p.name}" for p in PROTO_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_PATH}={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROJECT_DIR)
