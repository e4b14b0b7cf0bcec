"""The `dominator` program (main.py), thin: one module per command group."""

import os

# gRPC's C core logs failed connections to stderr on its own; the CLI reports each
# failure once, as one line. Set before grpc is first imported (by any command module).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
