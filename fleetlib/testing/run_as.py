"""Run a program's module as an unprivileged user:
`python -m fleetlib.testing.run_as UID MODULE ARGS`.

The interpreter here lives under /root, which other users cannot read, so the
process starts as root, imports the program, drops to UID (groups, gid, uid:
irreversibly), and only then runs it: everything the program does, it does as
that user.
"""

import importlib
import os
import sys

PRELOAD = ("concurrent.futures.thread", "concurrent.futures.process", "encodings.idna")


def main() -> None:
    """Import, drop privileges, run."""
    uid, module_name, *args = sys.argv[1:]
    module = importlib.import_module(module_name)
    for lazy in PRELOAD:  # imported on first use, when /root is no longer readable
        importlib.import_module(lazy)
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))
    sys.argv = [module_name, *args]
    module.main()


if __name__ == "__main__":
    main()
