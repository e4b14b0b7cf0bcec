"""Options several `dominator` command groups share."""

from __future__ import annotations

import click

from fleetlib.cli.options import address_option

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
imageserver_option = address_option(
    "imageserver", "DOMINATOR_IMAGESERVER", "localhost:6971", "The image server.")
# The master first, then more servers a host may fetch from, ranked by location.
imageservers_option = address_option(
    "imageserver", "DOMINATOR_IMAGESERVER", "localhost:6971",
    "The image server (the master). Repeat to add servers hosts fetch from, nearest first "
    "by location (imageserver --location), the master last.", multiple=True)
dominator_option = address_option("dominator", "DOMINATOR_ADDRESS", "localhost:6970",
                                  "The dominator's admin API.")
