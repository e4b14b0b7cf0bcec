"""Which hosts a deploy's selector takes, as plain functions free of pydantic (the
fleet CLI imports them at every command): the CLI's `--select` text as the API's
`select` object, and whether a host's tags match one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fleetlib.errors import FleetError


def parse_selector(text: str) -> dict[str, Any]:
    """`all`, `tags:K=V,K2=V2`, or `host-1,host-2` -> the API's `select` object."""
    text = text.strip()
    if text == "all":
        return {"all": True}
    if text.startswith("tags:"):
        tags = {}
        for pair in text[len("tags:"):].split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise FleetError(f"--select {text!r}: tags are KEY=VALUE pairs")
            tags[key.strip()] = value.strip()
        return {"tags": tags}
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise FleetError("--select: give `all`, `tags:K=V,...` or host names")
    return {"hosts": hosts}


def selects(select: Mapping[str, Any], tags: Mapping[str, str]) -> bool:
    """Whether `select` takes a host of these tags (by tags or all; hosts are by name)."""
    if select.get("all"):
        return True
    wanted: Mapping[str, str] = select.get("tags") or {}
    return all(tags.get(key) == value for key, value in wanted.items())
