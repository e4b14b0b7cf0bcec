"""A deploy as JSON: the deploy API's views (GET /v1/deploys/{id}, the list lines),
which the dashboard shows too, and a dry run's answer for one host. Both views go
through health.redact: no page or API answer shows a health check's credentials,
query values or a stored command line."""

from __future__ import annotations

import os
from typing import Any

from dominator.deploy.health import redact
from dominator.deploy.model import Deploy, HostProgress
from dominator.herd.convergence import PlanSummary
from dominator.herd.herd import high_impact
from fleetlib.fstree.diff import Change
from subd.changes import UpdatePlan

MAX_PLAN_PATHS = 1000          # changed paths listed per host in a dry run


def deploy_view(deploy: Deploy, status_url: str) -> dict[str, Any]:
    """The API's JSON (GET /v1/deploys/{id}), redacted."""
    result: dict[str, Any] = {
        "id": deploy.id, "status": deploy.status, "progress": deploy.progress(),
        "percent": deploy.percent(), "reason": deploy.reason, "image": deploy.request["image"],
        "dryRun": deploy.dry_run, "statusUrl": status_url,
        "createdUnix": deploy.created_unix, "updatedUnix": deploy.updated_unix,
        "idempotencyKey": deploy.idempotency_key, "cancel": deploy.cancel,
        "request": deploy.request, "started_by": deploy.started_by, "runner": deploy.runner,
        **wave_position(deploy),
        "waves": [{"index": index, "spec": wave.spec, "implied": wave.implied,
                   "target": wave.target, "status": wave.state, "hosts": wave.hosts,
                   "startedUnix": wave.started_unix, "finishedUnix": wave.finished_unix}
                  for index, wave in enumerate(deploy.waves, 1)],
        "hosts": {name: host_view(host) for name, host in deploy.hosts.items()},
    }
    if deploy.dry_run:
        result["wouldStop"] = {
            name: host.error or (host.plan and host.plan["wouldStop"])
            for name, host in deploy.hosts.items()
            if host.error or (host.plan and host.plan["wouldStop"])}
    redacted: dict[str, Any] = redact(result)
    return redacted


def relative_view(deploy: Deploy) -> dict[str, Any]:
    """The API's JSON with a relative status URL (for the dashboard)."""
    return deploy_view(deploy, f"/v1/deploys/{deploy.id}")


def wave_position(deploy: Deploy) -> dict[str, int]:
    """`wave` (1-based: the one in progress, or the last one reached) of `wave_count`."""
    return {"wave": min(deploy.wave + 1, len(deploy.waves)), "wave_count": len(deploy.waves)}


def deploy_summary(deploy: Deploy, status_url: str) -> dict[str, Any]:
    """One line of GET /v1/deploys, redacted: the API's camelCase keys, and the
    CLI's snake_case spelling of each next to them."""
    summary: dict[str, Any] = redact({
        "id": deploy.id, "status": deploy.status, "progress": deploy.progress(),
        "percent": deploy.percent(), "reason": deploy.reason, "image": deploy.request["image"],
        "dryRun": deploy.dry_run, "hosts": len(deploy.hosts), "statusUrl": status_url,
        "createdUnix": deploy.created_unix, "updatedUnix": deploy.updated_unix,
        "dry_run": deploy.dry_run, "status_url": status_url,
        "created_unix": int(deploy.created_unix), "updated_unix": int(deploy.updated_unix),
        "started_by": deploy.started_by, "runner": deploy.runner, **wave_position(deploy)})
    return summary


def host_view(host: HostProgress) -> dict[str, Any]:
    """One host of a deploy."""
    view: dict[str, Any] = {"wave": host.wave, "status": host.state,
                            "previousImage": host.previous_image, "error": host.error,
                            "health": host.health, "rollback": host.rollback,
                            "startedUnix": host.started_unix,
                            "finishedUnix": host.finished_unix}
    if host.plan is not None:
        view["plan"] = host.plan
    return view


def printable_path(path: str) -> str:
    """A path as JSON can carry it (undecodable bytes as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def plan_view(plan: UpdatePlan, summary: PlanSummary, stop: str) -> dict[str, Any]:
    """A dry run's answer for one host: counts, bytes, triggers (and which of them
    are HighImpact: `disruptive`), the paths, and why the herd would stop the
    update ("" when it would go ahead)."""
    kinds = {Change.ADD: "added", Change.REPLACE: "replaced", Change.METADATA: "metadata",
             Change.DELETE: "deleted"}
    paths: dict[str, list[str]] = {name: [] for name in kinds.values()}
    listed = 0
    for entry in plan.diff.entries:
        if listed < MAX_PLAN_PATHS:
            paths[kinds[entry.change]].append(printable_path(entry.path))
            listed += 1
    disruptive = sorted(high_impact(plan))
    return {"added": summary.added, "replaced": summary.replaced,
            "metadata": summary.metadata, "deleted": summary.deleted,
            "objectsToFetch": summary.objects_to_fetch, "bytesToFetch": summary.bytes_to_fetch,
            "bytesToWrite": summary.bytes_to_write, "triggers": summary.triggers,
            "unsafe": summary.unsafe, "wouldStop": stop,
            "highImpact": disruptive, "disruptive": bool(disruptive),
            "changes": {**paths, "count": len(plan.diff.entries),
                        "truncated": len(plan.diff.entries) > listed}}
