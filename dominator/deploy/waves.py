"""Waves: how a deploy's selected hosts are cut into cumulative steps ("1", "10%",
"100%"), and how many hosts each holds once it is done."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation

from dominator.deploy.errors import DeployError

DEFAULT_WAVES = ("1", "10%", "100%")
MAX_WAVES = 100
WAVE_RE = re.compile(r"(?P<count>[0-9]+)|(?P<percent>[0-9]+(?:\.[0-9]+)?)%")


def parse_wave(spec: str) -> tuple[str, Decimal]:
    """`"N"` (a number of hosts, at least 1) or `"P%"` (a share, 0 < P <= 100), as
    ("count", N) or ("percent", P)."""
    match = WAVE_RE.fullmatch(spec.strip())
    if match is None:
        raise DeployError(f"bad wave {spec!r}: a number of hosts (\"10\") or a percentage "
                          "of the selected hosts (\"25%\")")
    if match["count"] is not None:
        count = int(match["count"])
        if count < 1:
            raise DeployError(f"bad wave {spec!r}: a wave holds at least 1 host")
        return "count", Decimal(count)
    try:
        percent = Decimal(match["percent"])
    except InvalidOperation:
        raise DeployError(f"bad wave {spec!r}") from None
    if not 0 < percent <= 100:
        raise DeployError(f"bad wave {spec!r}: a percentage must be above 0% and at most 100%")
    return "percent", percent


def check_waves(specs: Iterable[str]) -> list[str]:
    """Valid wave specs, normalized. Waves are cumulative (each says how many of
    the selected hosts run the image once it is done), so two of the same kind
    must grow: ["50%", "10%"] is refused."""
    specs = [str(spec).strip() for spec in specs]
    if not specs:
        raise DeployError("waves: give at least one wave, e.g. [\"1\", \"10%\", \"100%\"]")
    if len(specs) > MAX_WAVES:
        raise DeployError(f"waves: at most {MAX_WAVES} waves")
    last: dict[str, tuple[str, Decimal]] = {}
    for spec in specs:
        kind, value = parse_wave(spec)
        previous = last.get(kind)
        if previous is not None and value <= previous[1]:
            raise DeployError(f"bad waves: {spec!r} after {previous[0]!r} does not grow; waves "
                              "are cumulative (each is the total converged once it is done)")
        last[kind] = (spec, value)
    return specs


def wave_targets(specs: list[str], total: int) -> list[tuple[str, int, bool]]:
    """(spec, hosts converged once the wave is done, implied) for each wave over
    `total` hosts. A count is capped at `total`, a share rounds up; a wave never
    shrinks (mixing counts and shares); when the last wave stops short of every
    host, an implied "100%" wave follows."""
    targets = []
    reached = 0
    for spec in specs:
        kind, value = parse_wave(spec)
        if kind == "count":
            target = min(int(value), total)
        else:
            target = min(total, math.ceil(value * total / 100))
        reached = max(reached, target)
        targets.append((spec, reached, False))
    if reached < total:
        targets.append(("100%", total, True))
    return targets

