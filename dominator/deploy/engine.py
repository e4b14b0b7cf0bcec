"""The deploy engine: takes deploy requests (checked against the image server,
the MDB and the deploys running), runs each as one asyncio task (rollout.py runs
its waves), and answers lookups and cancels.

Every deploy lives in the database the dominators share (the PostgreSQL MDB's, else
the state file) and is saved after each change of state, fenced by its runner lease
(store.py, lease.py): any dominator accepts a deploy (and runs it), answers for every
deploy, and records a cancel for the one running it; every lease/3 each dominator
renews its deploys and claims running ones whose runner died, resuming them from
their saved state, as a restarted dominator resumes its own. The engine reaches the
herd, the state store, the MDB and the image server through the ports of ports.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import sqlalchemy as sa

from dominator.deploy.errors import Busy, Conflict, DeployError, Unavailable, UnknownDeploy
from dominator.deploy.health import NO_CHECKS, NamedChecks
from dominator.deploy.lease import LeaseLost, RunnerLease
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
from dominator.deploy.store import DeployStore, Held, KeyUsed
from dominator.deploy.waves import wave_targets
from dominator.herd.leases import DEFAULT_LEASE_SECONDS, RETRY_FRACTION
from fleetlib.errors import FleetError
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.sql.engine import error_line

log = logging.getLogger(__name__)

DRY_RUN_WAIT_SECONDS = 10.0    # a POST waits this long for a dry run to finish
T = TypeVar("T")


class DeployEngine:
    """Runs deploys: one asyncio task each, on the dominator's event loop."""

    def __init__(self, herd: HerdPort, state: StatePort, mdb: MdbPort, images: ImagesPort,
                 max_running: int = 4, tick: float = 0.5, health_slots: int = 32,
                 plan_slots: int = 20, health_checks: NamedChecks = NO_CHECKS,
                 name: str = "", lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.herd = herd
        self.state = state
        self.mdb = mdb
        self.images = images
        self.max_running = max_running
        self.tick = tick
        self.name = name or socket.gethostname()  # the runner named in the deploys it runs
        self.store = DeployStore(state.database, self.name, lease_seconds)
        self.lease = RunnerLease(lease_seconds, expires=self.store.postgres)
        self.health_checks = health_checks  # the operator's allow-list (serve --health-check)
        self.rollout = Rollout(herd, state, mdb, self.store, self.lease, tick, health_slots,
                               plan_slots, health_checks)
        self._running: dict[str, Deploy] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._submit = asyncio.Lock()
        self._stopping = False
        self._stop = asyncio.Event()
        self._leasing: asyncio.Task[None] | None = None
        self._resumed = False  # whether a round took this dominator's previous deploys
        # Rounds never queue behind the herd's blocking calls in the default executor:
        # a round late by more than a third of the lease pauses every deploy run here.
        self._lease_thread = ThreadPoolExecutor(1, thread_name_prefix="deploy-lease")

    # Lifecycle.

    async def start(self) -> None:
        """Resume every deploy this dominator ran when it stopped (on SQLite: every
        running deploy), and whatever else is free, then keep the leases."""
        await self._round()
        self._leasing = asyncio.create_task(self._keep_leases(), name="deploy leases")

    async def stop(self) -> None:
        """Stop every deploy task where it is and give their leases back; saved state
        lets the next start, or another dominator, resume them."""
        self._stopping = True
        self._stop.set()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._leasing is not None:
            await asyncio.gather(self._leasing, return_exceptions=True)
        held, self.lease.tokens = self.lease.tokens, {}
        try:
            await asyncio.to_thread(self.store.release, held)
        except sa.exc.SQLAlchemyError as err:
            log.warning("could not give back %d deploy lease(s) (%s): they expire instead",
                        len(held), error_line(err))
        self._lease_thread.shutdown(wait=False)
        await self.rollout.close()

    # Runner leases.

    async def _keep_leases(self) -> None:
        """A round every lease/3 (sooner after a failure) until stopped."""
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                ok = await self._round()
            except Exception:  # noqa: BLE001 - the leases must be kept whatever one round did
                log.exception("deploy lease round failed")
                ok = False
            interval = self.lease.renew_interval * (1 if ok else RETRY_FRACTION)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(),
                                       max(0.0, began + interval - time.monotonic()))

    async def _round(self) -> bool:
        """Renew the deploys run here, stop those lost, resume those paused, pick up
        cancels asked elsewhere, claim free deploys up to max_running (and, the first
        time, every deploy this dominator's previous process ran). False when the
        database failed (the leases stay trusted until their deadline)."""
        began = time.monotonic()
        held = dict(self.lease.tokens)
        wanted = self.max_running - len(held)
        try:
            done = await asyncio.get_running_loop().run_in_executor(
                self._lease_thread,
                functools.partial(self.store.round, held, wanted, not self._resumed))
        except sa.exc.SQLAlchemyError as err:
            reason = error_line(err)
            if not self.lease.failure:
                log.warning("deploy lease renewal failed (%s): %d deploy(s) run here stay "
                            "trusted %.1f s more, then pause", reason, len(held),
                            max(0.0, self.lease.deadline - time.monotonic()))
            self.lease.failure = reason
            return False
        if self.lease.failure:
            log.info("deploy lease renewal works again (%s)", self.lease.failure)
            self.lease.failure = ""
        self.lease.renewed(began)
        self._resumed = True
        for deploy_id, token in held.items():
            if deploy_id not in done.renewed and self.lease.tokens.get(deploy_id) == token:
                self._lose(deploy_id, f"its lease (token {token}) expired")
        for deploy_id, found in done.renewed.items():
            try:
                await self._renewed(deploy_id, found)
            except (sa.exc.SQLAlchemyError, DeployError) as err:  # the next round retries
                log.warning("deploy %s: %s", deploy_id, error_line(err)
                            if isinstance(err, sa.exc.SQLAlchemyError) else err)
        for claimed in done.claimed:
            deploy = claimed.deploy
            log.info("deploy %s: %s (%s)", deploy.id,
                     "resuming" if claimed.previous in ("", self.name) or not self.store.postgres
                     else f"taking over from {claimed.previous}", deploy.progress())
            self.lease.tokens[deploy.id] = claimed.token
            self._spawn(deploy)
        return True

    async def _renewed(self, deploy_id: str, found: Held) -> None:
        """A deploy still run here: resume it if it paused, apply a cancel asked elsewhere."""
        if self.lease.tokens.get(deploy_id) != found.token:
            return  # ended (or lost) while the round ran
        deploy = self._running.get(deploy_id)
        if deploy is None:
            deploy = await asyncio.to_thread(self.store.get, deploy_id)
            if deploy is None or deploy.status != DeployStatus.RUNNING:
                self.lease.tokens.pop(deploy_id, None)
                return
            log.info("deploy %s: lease renewed, resuming (%s)", deploy_id, deploy.progress())
            deploy.runner = self.name
            self._spawn(deploy)
        elif found.cancel is not None:
            await self._cancel_here(deploy, bool(found.cancel["rollback"]),
                                    float(found.cancel["requestedUnix"]))

    def _lose(self, deploy_id: str, why: str) -> None:
        """Another dominator may run the deploy now: stop its task at once, unsaved."""
        del self.lease.tokens[deploy_id]
        task = self._tasks.get(deploy_id)
        log.warning("deploy %s: %s: stopping it here without writing", deploy_id, why)
        if task is not None:
            task.cancel()

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
                existing = await self._replay(key, request)
                if existing is not None:
                    return existing, False
            spec = DeploySpec.from_request(request, self.health_checks)
            await self._check_image(spec.image)
            hosts = await self._select(spec)
            await self._check_capacity(spec)
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
            try:  # the store refuses a host of a deploy running anywhere (Conflict)
                token = await self._stored(lambda: self.store.insert(deploy))
            except KeyUsed:
                assert key is not None
                existing = await self._replay(key, request)
                if existing is None:
                    raise
                return existing, False
            assert token is not None
            self.lease.tokens[deploy.id] = token
            log.info("deploy %s: %s%s to %d host(s) in %d wave(s)", deploy.id, spec.image,
                     " (dry run)" if spec.dry_run else "", len(hosts), len(deploy.waves))
            task = self._spawn(deploy)
        if spec.dry_run:
            await asyncio.wait([task], timeout=DRY_RUN_WAIT_SECONDS)
        return deploy, True

    async def _replay(self, key: str, request: dict[str, Any]) -> Deploy | None:
        """The deploy made for the idempotency key (through any dominator), or None;
        Conflict when it was made for another request."""
        existing = await self._stored(lambda: self.store.by_key(key))
        if existing is None:
            return None
        existing = self._running.get(existing.id, existing)
        if existing.request != request:
            raise Conflict(f"Idempotency-Key {key!r} was used for deploy "
                           f"{existing.id} with a different request")
        return existing

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
        """Stop after the hosts in flight (or roll back every touched host). A deploy
        another dominator runs gets the request recorded for its runner to pick up at
        its next lease round; the deploy returned shows it canceling meanwhile."""
        deploy = self._running.get(deploy_id)
        if deploy is None:
            stored = await self.lookup(deploy_id)
            if stored.status == DeployStatus.RUNNING:
                asked = await self._stored(
                    lambda: self.store.request_cancel(deploy_id, rollback, time.time()))
                if asked is not None and asked.status == DeployStatus.RUNNING:
                    log.info("deploy %s: cancel%s requested of its runner %s", deploy_id,
                             " with rollback" if rollback else "", asked.runner or "(none yet)")
                    return asked
                stored = asked or stored
            deploy = stored
        if deploy.status != DeployStatus.RUNNING:
            if deploy.status == DeployStatus.CANCELED:
                return deploy
            raise Conflict(f"deploy {deploy_id} has ended ({deploy.status}); nothing to cancel")
        await self._cancel_here(deploy, rollback, time.time())
        return deploy

    async def _cancel_here(self, deploy: Deploy, rollback: bool, unix: float) -> None:
        """Cancel a deploy run here (asked through this dominator or another)."""
        if deploy.phase == Phase.ROLLBACK or deploy.status != DeployStatus.RUNNING:
            return  # already undoing itself, or ending
        if deploy.cancel is None or (rollback and not deploy.cancel["rollback"]):
            deploy.cancel = {"rollback": rollback, "requestedUnix": unix}
            try:
                await self.rollout.save(deploy)
            except LeaseLost as err:
                raise Unavailable(f"{err}; try again in a few seconds") from None
            log.info("deploy %s: cancel requested%s", deploy.id,
                     " with rollback" if rollback else "")
            task, wake = self._tasks.get(deploy.id), self.rollout.wake.get(deploy.id)
            if deploy.dry_run and task is not None:
                task.cancel()
            if wake is not None:
                wake.set()

    async def _stored(self, call: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(call)
        except DeployError:
            raise
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

    async def _check_capacity(self, spec: DeploySpec) -> None:
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

    async def _run(self, deploy: Deploy) -> None:
        paused = False
        token = self.lease.tokens.get(deploy.id)
        try:
            if deploy.dry_run:
                await self.rollout.dry_run(deploy)
            else:
                await self.rollout.deploy(deploy)
        except LeaseLost as err:
            paused = err.paused
            log.warning("%s; stopped here without writing", err)
        except sa.exc.SQLAlchemyError as err:  # not a failure of the deploy: pause it
            paused = True
            log.warning("deploy %s: the database failed (%s): paused until a lease round "
                        "works again", deploy.id, error_line(err))
        except asyncio.CancelledError:
            lost = deploy.id not in self.lease.tokens  # _lose stopped it
            if deploy.dry_run and deploy.cancel and not self._stopping and not lost:
                with contextlib.suppress(LeaseLost):
                    await self.rollout.finish(deploy, DeployStatus.CANCELED, "canceled")
            elif not self._stopping and not lost:
                raise
        except Exception as err:  # noqa: BLE001 - a deploy must end with a reason
            log.exception("deploy %s failed", deploy.id)
            try:
                await self.rollout.finish(deploy, DeployStatus.TERMINAL, f"internal error: {err}")
            except Exception:  # noqa: BLE001
                log.exception("deploy %s: cannot save its end", deploy.id)
        finally:
            if self._tasks.get(deploy.id) is asyncio.current_task():  # not a later claim's
                del self._running[deploy.id], self._tasks[deploy.id]
                self.rollout.wake.pop(deploy.id, None)
            if not paused and not self._stopping and self.lease.tokens.get(deploy.id) == token:
                del self.lease.tokens[deploy.id]  # ended here: nothing left to renew
