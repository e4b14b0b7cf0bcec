"""The deploy engine: takes deploy requests (checked against the image server,
the MDB and the deploys running), runs each as one asyncio task (rollout.py runs
its waves), and answers lookups and cancels.

Every deploy lives in the dominator's state database and is saved after each
change of state, so a restarted dominator resumes each running deploy where it
was. The engine reaches the herd, the state store, the MDB and the image server
through the ports of ports.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import sqlalchemy as sa

from dominator.deploy.errors import Busy, Conflict, DeployError, Unavailable, UnknownDeploy
from dominator.deploy.health import NO_CHECKS, NamedChecks
from dominator.deploy.model import (
    Deploy,
    DeploySpec,
    DeployStatus,
    HostProgress,
    Phase,
    Wave,
    WaveState,
)
from dominator.deploy.ports import HerdPort, ImagesPort, MdbPort, StatePort
from dominator.deploy.rollout import Rollout
from dominator.deploy.store import DeployStore
from dominator.deploy.waves import wave_targets
from fleetlib.errors import FleetError
from fleetlib.rpc.status import describe_rpc_error

log = logging.getLogger(__name__)

DRY_RUN_WAIT_SECONDS = 10.0    # a POST waits this long for a dry run to finish
T = TypeVar("T")


class DeployEngine:
    """Runs deploys: one asyncio task each, on the dominator's event loop."""

    def __init__(self, herd: HerdPort, state: StatePort, mdb: MdbPort, images: ImagesPort,
                 max_running: int = 4, tick: float = 0.5, health_slots: int = 32,
                 plan_slots: int = 20, health_checks: NamedChecks = NO_CHECKS) -> None:
        self.herd = herd
        self.state = state
        self.mdb = mdb
        self.images = images
        self.max_running = max_running
        self.tick = tick
        self.store = DeployStore(state.engine)
        self.health_checks = health_checks  # the operator's allow-list (serve --health-check)
        self.rollout = Rollout(herd, state, mdb, self.store, tick, health_slots, plan_slots,
                               health_checks)
        self._running: dict[str, Deploy] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._submit = asyncio.Lock()
        self._stopping = False

    # Lifecycle.

    async def start(self) -> None:
        """Resume every deploy that was running when the dominator stopped."""
        for deploy in await asyncio.to_thread(self.store.running):
            log.info("deploy %s: resuming (%s)", deploy.id, deploy.progress())
            self._spawn(deploy)

    async def stop(self) -> None:
        """Stop every deploy task where it is; saved state lets the next start resume."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.rollout.close()

    def _spawn(self, deploy: Deploy) -> asyncio.Task[None]:
        self._running[deploy.id] = deploy
        self.rollout.wake[deploy.id] = asyncio.Event()
        task = self._tasks[deploy.id] = asyncio.create_task(self._run(deploy),
                                                            name=f"deploy {deploy.id}")
        return task

    # Requests.

    async def submit(self, request: dict[str, Any], key: str | None,
                     by: str = "") -> tuple[Deploy, bool]:
        """Start a deploy (or a dry run) for `by` (who asks): (the deploy, whether it
        is new). With an idempotency key already used, the deploy made for it."""
        async with self._submit:
            if key:
                existing = await self._stored(lambda: self.store.by_key(key))
                if existing is not None:
                    existing = self._running.get(existing.id, existing)
                    if existing.request != request:
                        raise Conflict(f"Idempotency-Key {key!r} was used for deploy "
                                       f"{existing.id} with a different request")
                    return existing, False
            spec = DeploySpec.from_request(request, self.health_checks)
            await self._check_image(spec.image)
            hosts = await self._select(spec)
            await self._check_capacity(spec, hosts)
            deploy = Deploy(secrets.token_hex(8), key or None, request,
                            waves=[], hosts={}, started_by=by)
            for index, (wave_spec, target, implied) in enumerate(
                    wave_targets(list(spec.waves), len(hosts)), 1):
                done = sum(len(w.hosts) for w in deploy.waves)
                members = hosts[done:target]
                deploy.waves.append(Wave(wave_spec, target, members, implied,
                                         WaveState.PENDING if members else WaveState.SKIPPED))
                for name in members:
                    deploy.hosts[name] = HostProgress(index)
            await self._stored(lambda: self.store.insert(deploy))
            log.info("deploy %s: %s%s to %d host(s) in %d wave(s)", deploy.id, spec.image,
                     " (dry run)" if spec.dry_run else "", len(hosts), len(deploy.waves))
            task = self._spawn(deploy)
        if spec.dry_run:
            await asyncio.wait([task], timeout=DRY_RUN_WAIT_SECONDS)
        return deploy, True

    async def lookup(self, deploy_id: str) -> Deploy:
        """The deploy (UnknownDeploy when there is none of that id)."""
        deploy = self._running.get(deploy_id)
        if deploy is None:
            deploy = await self._stored(lambda: self.store.get(deploy_id))
        if deploy is None:
            raise UnknownDeploy(f"no deploy {deploy_id!r}")
        return deploy

    async def newest(self, limit: int, status: str | None = None,
                     dry_run: bool | None = None) -> list[Deploy]:
        """Deploys, newest first (optionally of one status, only dry runs or none)."""
        deploys = await self._stored(lambda: self.store.newest(limit, status, dry_run))
        return [self._running.get(deploy.id, deploy) for deploy in deploys]

    def get(self, deploy_id: str) -> Deploy | None:
        """The deploy, or None (a synchronous read, for callers outside a coroutine)."""
        return self._running.get(deploy_id) or self.store.get(deploy_id)

    async def cancel(self, deploy_id: str, rollback: bool) -> Deploy:
        """Stop after the hosts in flight (or roll back every touched host)."""
        deploy = self._running.get(deploy_id)
        if deploy is None or deploy.status != DeployStatus.RUNNING:
            stored = deploy or await self.lookup(deploy_id)
            if stored.status == DeployStatus.CANCELED:
                return stored
            raise Conflict(f"deploy {deploy_id} has ended ({stored.status}); nothing to cancel")
        if deploy.phase == Phase.ROLLBACK:
            return deploy  # already undoing itself
        if deploy.cancel is None or (rollback and not deploy.cancel["rollback"]):
            deploy.cancel = {"rollback": rollback, "requestedUnix": time.time()}
            await self.rollout.save(deploy)
            log.info("deploy %s: cancel requested%s", deploy.id,
                     " with rollback" if rollback else "")
            task, wake = self._tasks.get(deploy.id), self.rollout.wake.get(deploy.id)
            if deploy.dry_run and task is not None:
                task.cancel()
            if wake is not None:
                wake.set()
        return deploy

    async def _stored(self, call: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(call)
        except FleetError as err:
            raise Unavailable(f"state database: {err}") from None
        except sa.exc.SQLAlchemyError as err:
            raise Unavailable(f"state database: {type(err).__name__}") from None

    async def _check_image(self, name: str) -> None:
        try:
            image = await self.images.get(name)
        except grpc.RpcError as err:
            raise Unavailable(f"cannot reach the image server: {describe_rpc_error(err)}"
                              ) from None
        if image is None:
            raise DeployError(f"unknown image {name!r}: the image server does not hold it")

    async def _select(self, spec: DeploySpec) -> list[str]:
        try:
            machines = await asyncio.to_thread(self.mdb.list)
        except FleetError as err:
            raise Unavailable(f"cannot read the MDB: {err}") from None
        known = {machine.hostname: machine for machine in machines}
        if spec.select.get("hosts") is not None:
            names = sorted(set(spec.select["hosts"]))
            unknown = [name for name in names if name not in known]
            if unknown:
                raise DeployError(f"select.hosts: unknown host{'s' if len(unknown) > 1 else ''}"
                                  f" {', '.join(unknown[:10])}"
                                  f"{' ...' if len(unknown) > 10 else ''} (not in the MDB)")
        else:
            names = [name for name, machine in sorted(known.items()) if spec.selects(machine)]
        if not names:
            raise DeployError(f"empty selection: {json.dumps(spec.select)} matches no host "
                              "of the MDB")
        loading = [name for name in names if name not in self.herd.subs]
        if loading:
            raise Unavailable(f"the dominator has not loaded {loading[0]} from the MDB yet; "
                              "try again in a few seconds")
        return names

    async def _check_capacity(self, spec: DeploySpec, hosts: list[str]) -> None:
        running = [d for d in self._running.values() if d.dry_run == spec.dry_run]
        if len(running) >= self.max_running:
            raise Busy(f"{len(running)} {'dry runs' if spec.dry_run else 'deploys'} are "
                       f"running (at most {self.max_running} at once); try again later")
        if spec.dry_run:
            return
        disabled = await asyncio.to_thread(self.state.updates_disabled)
        if disabled is not None:
            raise Unavailable(f"updates are disabled fleet-wide by {disabled.by}: "
                              f"{disabled.reason}; try again once they are enabled")
        wanted: set[str] = set(hosts)
        for other in running:
            if other.status == DeployStatus.RUNNING and other.phase != Phase.DONE:
                shared = sorted(wanted & set(other.hosts))
                if shared:
                    raise Conflict(f"host {shared[0]} is in running deploy {other.id} "
                                   f"({other.request['image']}); cancel it or wait for it "
                                   "to end")

    async def _run(self, deploy: Deploy) -> None:
        try:
            if deploy.dry_run:
                await self.rollout.dry_run(deploy)
            else:
                await self.rollout.deploy(deploy)
        except asyncio.CancelledError:
            if deploy.dry_run and deploy.cancel and not self._stopping:
                await self.rollout.finish(deploy, DeployStatus.CANCELED, "canceled")
            elif not self._stopping:
                raise
        except Exception as err:  # noqa: BLE001 - a deploy must end with a reason
            log.exception("deploy %s failed", deploy.id)
            try:
                await self.rollout.finish(deploy, DeployStatus.TERMINAL, f"internal error: {err}")
            except Exception:  # noqa: BLE001
                log.exception("deploy %s: cannot save its end", deploy.id)
        finally:
            self._running.pop(deploy.id, None)
            self._tasks.pop(deploy.id, None)
            self.rollout.wake.pop(deploy.id, None)
