"""The ports each program listens on by default (DESIGN.md "Ports"): one table, so the
daemons, the clients and the CLI's hints agree."""

from __future__ import annotations

SUBD_PORT = 6969
DOMINATOR_PORT = 6970
IMAGESERVER_PORT = 6971
DEPLOY_HTTP_PORT = 6980

# Role (the certificate's CN a client expects) -> (what to call it, default port).
ROLES = {
    "subd": ("subd", SUBD_PORT),
    "dominator": ("the dominator", DOMINATOR_PORT),
    "imageserver": ("the image server", IMAGESERVER_PORT),
}
