"""Regenerate the committed gRPC/protobuf modules from proto/*.proto.

Run as `python -m proto.generate [OUTDIR]` (or `make proto`). The modules are
committed so that installing the project needs no protoc; a test regenerates
them into a temporary folder and fails if the committed ones are stale.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PROTO_DIR.parent


def generate(out_dir: Path) -> None:
    """Compile every .proto of proto/ into `out_dir`/proto/ (imports stay `proto.x_pb2`)."""
    (out_dir / "proto").mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    sources = sorted(str(p.relative_to(PROJECT_DIR)) for p in PROTO_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROJECT_DIR}",
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
