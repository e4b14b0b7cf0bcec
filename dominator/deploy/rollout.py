"""Running a deploy: a wave sets the required image of its hosts in the MDB, waits
until the herd has them synced on it, runs the health gate on each, and only then
lets the next wave start. More failed hosts than `maxFailures` stop the deploy:
every host it touched gets its previous required image back, and it ends TERMINAL.
A cancel lets the hosts in flight finish and leaves the rest untouched (or rolls
back, if asked). With `allowDisruption` the deploy lets each host's update run
HighImpact triggers, granting the once-only allowance just before it sets the
host's image (and taking back one the update left unused); `maxDisruptions` keeps
at most that many hosts of a wave updating at a time. A dry run plans every
selected host with the herd's own planning and changes nothing."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import httpx

from dominator.deploy.health import NamedChecks
from dominator.deploy.lease import LeaseLost, RunnerLease
from dominator.deploy.model import (
    Deploy,
    DeploySpec,
    DeployStatus,
    HostState,
    Phase,
    Wave,
    WaveState,
)
from dominator.deploy.ports import HerdPort, MdbPort, StatePort
from dominator.deploy.store import DeployStore
from dominator.deploy.views import plan_view
from dominator.herd.herd import Sub
from dominator.herd.status import Status
from fleetlib.errors import FleetError
from fleetlib.rpc.status import describe_rpc_error
from mdb.machine import Machine

log = logging.getLogger(__name__)

SYNCED = {Status.SYNCED, Status.INTRUSION}
# Herd verdicts that fail a host (when it gives them twice for the deploy's image:
# the first may be the end of a cycle that began before the MDB changed).
FAILING = {Status.UNSAFE, Status.FAILED, Status.MISSING_COMPUTED, Status.NO_SPACE,
           Status.DISRUPTION_DENIED}
DENIED = f"{Status.DISRUPTION_DENIED.value}: "  # a plan's stop: HighImpact, not allowed
FAILURE_VERDICTS = 2


class HostWatch:
    """Counts the herd's failure verdicts on one sub while it must hold `image`."""

    def __init__(self, sub: Sub, image: str) -> None:
        self.sub = sub
        self.image = image
        self.verdicts = 0
        self.last = ""
        sub.listeners.append(self._heard)

    def _heard(self, status: str, error: str) -> None:
        if Status(status) in FAILING and self.sub.machine.required_image == self.image:
            self.verdicts += 1
            self.last = f"{status}: {error}" if error else status

    def close(self) -> None:
        if self._heard in self.sub.listeners:
            self.sub.listeners.remove(self._heard)


class Rollout:
    """Runs the waves of deploys (and their rollbacks, and dry runs): each host set
    its image in the MDB, judged by the herd's verdicts, then health-checked."""

    def __init__(self, herd: HerdPort, state: StatePort, mdb: MdbPort, store: DeployStore,
                 lease: RunnerLease, tick: float, health_slots: int, plan_slots: int,
                 health_checks: NamedChecks) -> None:
        self.herd = herd
        self.state = state
        self.mdb = mdb
        self.store = store
        self.lease = lease  # every write for a deploy is checked against its runner lease
        self.tick = tick
        self.wake: dict[str, asyncio.Event] = {}  # per running deploy: look again now
        self._health_slots = asyncio.Semaphore(health_slots)
        self._health_checks = health_checks
        self._plan_slots = asyncio.Semaphore(plan_slots)
        self._client: httpx.AsyncClient | None = None

    async def close(self) -> None:
        """Close the health gate's HTTP client."""
        if self._client is not None:
            await self._client.aclose()

    async def save(self, deploy: Deploy) -> None:
        """Store the deploy's state now, fenced by its runner token; LeaseLost (nothing
        written) when the lease is not trusted or another dominator took the deploy."""
        token = self.lease.check(deploy.id)
        deploy.updated_unix = time.time()
        if not await asyncio.to_thread(self.store.save, deploy, token):
            if self.lease.tokens.get(deploy.id) == token:
                del self.lease.tokens[deploy.id]
            raise LeaseLost(f"deploy {deploy.id}: another dominator took it over "
                            f"(token {token} refused)")

    async def finish(self, deploy: Deploy, status: DeployStatus, reason: str) -> None:
        """End the deploy with `status` and why."""
        deploy.status = status
        deploy.reason = reason
        deploy.phase = Phase.DONE
        await self.save(deploy)
        log.info("deploy %s: %s%s (%s)", deploy.id, status, f": {reason}" if reason else "",
                 deploy.progress())

    async def dry_run(self, deploy: Deploy) -> None:
        """Plan every host of a dry run with the herd's planning; change nothing.
        With allowDisruption, HighImpact triggers do not stop a host's plan."""
        image = deploy.request["image"]
        allowed = deploy.spec.allow_disruption

        async def plan(name: str) -> None:
            host = deploy.hosts[name]
            host.started_unix = time.time()
            async with self._plan_slots:
                try:
                    planned = await self.herd.plan_for(name, image)
                except FleetError as err:
                    host.state, host.error = HostState.FAILED, str(err)
                except grpc.RpcError as err:
                    host.state, host.error = HostState.FAILED, describe_rpc_error(err)
                else:
                    plan, summary, stop = planned
                    if allowed and stop.startswith(DENIED):  # the deploy would allow it
                        stop = ""
                    host.state, host.plan = HostState.PLANNED, plan_view(plan, summary, stop)
            host.finished_unix = time.time()

        for wave in deploy.waves:
            wave.state = WaveState.RUNNING if wave.hosts else WaveState.SKIPPED
        await asyncio.gather(*(plan(name) for name in deploy.hosts))
        for wave in deploy.waves:
            if wave.hosts:
                wave.state = WaveState.PLANNED
        await self.finish(deploy, DeployStatus.SUCCEEDED, "")

    async def deploy(self, deploy: Deploy) -> None:
        """Run (or resume) a deploy's waves, and its rollback when it needs one."""
        spec = deploy.spec
        while deploy.phase == Phase.WAVES:
            if deploy.cancel and deploy.cancel["rollback"]:
                await self._enter_rollback(deploy, DeployStatus.CANCELED, "canceled")
                break
            if deploy.wave >= len(deploy.waves):
                await self.finish(deploy, DeployStatus.SUCCEEDED, self._success_note(deploy, spec))
                return
            if deploy.cancel:
                await self._stop_canceled(deploy)
                return
            wave = deploy.waves[deploy.wave]
            outcome = await self._run_wave(deploy, spec, wave)
            if outcome == "canceled":
                await self._stop_canceled(deploy)
                return
            if outcome == "failed":
                failed = [(h.finished_unix, n, h.error) for n, h in deploy.hosts.items()
                          if h.error]
                _, name, error = max(failed)
                await self._enter_rollback(
                    deploy, DeployStatus.TERMINAL, f"{len(failed)} host(s) failed, more "
                    f"than maxFailures {spec.max_failures}, in wave {deploy.wave + 1}: "
                    f"{name}: {error}")
                break
            if outcome == "rollback":
                await self._enter_rollback(deploy, DeployStatus.CANCELED, "canceled")
                break
            deploy.wave += 1
            await self.save(deploy)
        if deploy.phase == Phase.ROLLBACK:
            await self._rollback(deploy, spec)

    @staticmethod
    def _success_note(deploy: Deploy, spec: DeploySpec) -> str:
        notes = []
        failed = sorted((h.finished_unix, n, h.error) for n, h in deploy.hosts.items()
                        if h.error)
        if failed:
            _, name, error = failed[-1]
            notes.append(f"{len(failed)} host(s) failed, within maxFailures "
                         f"{spec.max_failures}: {name}: {error}")
        if deploy.cancel:
            notes.append("cancel requested during the last wave, when every host had started")
        return "; ".join(notes)

    async def _stop_canceled(self, deploy: Deploy) -> None:
        within = (deploy.wave < len(deploy.waves)
                  and deploy.waves[deploy.wave].state == WaveState.CANCELED)
        where = (f"during wave {deploy.wave + 1}" if within else f"after wave {deploy.wave}")
        untouched = 0
        for wave in deploy.waves[deploy.wave:]:
            if wave.state == WaveState.PENDING:
                wave.state = WaveState.SKIPPED
            for name in wave.hosts:
                host = deploy.hosts[name]
                if host.state == HostState.PENDING:
                    host.state = HostState.SKIPPED
                    untouched += 1
        await self.finish(deploy, DeployStatus.CANCELED,
                           f"canceled {where} of {len(deploy.waves)}; "
                           f"{untouched} host(s) left untouched")

    async def _enter_rollback(self, deploy: Deploy, ending: DeployStatus, reason: str) -> None:
        deploy.phase, deploy.ending, deploy.reason = Phase.ROLLBACK, ending, reason
        for wave in deploy.waves:
            if wave.state == WaveState.PENDING:
                wave.state = WaveState.SKIPPED
            elif wave.state == WaveState.RUNNING:
                wave.state = (WaveState.FAILED if ending == DeployStatus.TERMINAL
                              else WaveState.CANCELED)
                wave.finished_unix = wave.finished_unix or time.time()
        for host in deploy.hosts.values():
            if host.state == HostState.PENDING:
                host.state = HostState.SKIPPED
        await self.save(deploy)
        log.warning("deploy %s: rolling back: %s", deploy.id, reason)

    async def _sleep(self, deploy: Deploy) -> None:
        wake = self.wake[deploy.id]
        try:
            await asyncio.wait_for(wake.wait(), self.tick)
        except TimeoutError:
            pass
        wake.clear()

    async def _run_wave(self, deploy: Deploy, spec: DeploySpec, wave: Wave) -> str:
        """Converge and check one wave: "ok", "failed" (too many failures),
        "rollback" (canceled with rollback) or "canceled" (canceled while hosts of
        the wave still waited for a disruption slot)."""
        if wave.state == WaveState.PENDING:
            wave.state, wave.started_unix = WaveState.RUNNING, time.time()
            await self.save(deploy)
        if wave.state != WaveState.RUNNING:
            return "ok"
        await self._start_hosts(deploy, spec, wave.hosts, self._free_slots(deploy, spec, wave))
        deadlines: dict[str, float] = {}
        watches: dict[str, HostWatch] = {}
        checks: dict[str, asyncio.Task[tuple[bool, str]]] = {}
        try:
            while True:
                if deploy.cancel and deploy.cancel["rollback"]:
                    return "rollback"
                for name in wave.hosts:
                    if deploy.hosts[name].state == HostState.UPDATING:
                        deadlines.setdefault(name, time.monotonic() + spec.wave_timeout)
                changed = await self._judge(deploy, spec.image, wave.hosts, HostState.UPDATING,
                                            deadlines, watches, spec.wave_timeout,
                                            HostState.CHECKING if spec.health
                                            else HostState.CONVERGED)
                for name in wave.hosts:
                    host = deploy.hosts[name]
                    if host.state == HostState.CHECKING and name not in checks:
                        checks[name] = asyncio.create_task(self._check(spec, name))
                for name, task in list(checks.items()):
                    if task.done():
                        del checks[name]
                        healthy, seen = task.result()
                        host = deploy.hosts[name]
                        host.health = seen
                        host.finished_unix = time.time()
                        if healthy:
                            host.state = HostState.CONVERGED
                        else:
                            host.state = HostState.FAILED
                            host.error = f"health check failed: {seen}"
                        changed = True
                if deploy.failures() > spec.max_failures:
                    wave.finished_unix = time.time()
                    return "failed"
                states = [deploy.hosts[name].state for name in wave.hosts]
                if all(state in (HostState.CONVERGED, HostState.FAILED) for state in states):
                    wave.state, wave.finished_unix = WaveState.SUCCEEDED, time.time()
                    await self.save(deploy)
                    return "ok"
                if deploy.cancel and HostState.PENDING in states and not any(
                        state in (HostState.UPDATING, HostState.CHECKING) for state in states):
                    wave.state, wave.finished_unix = WaveState.CANCELED, time.time()
                    return "canceled"
                slots = self._free_slots(deploy, spec, wave)
                if slots and not deploy.cancel and HostState.PENDING in states:
                    await self._start_hosts(deploy, spec, [
                        name for name in wave.hosts
                        if deploy.hosts[name].state == HostState.PENDING][:slots])
                    continue
                if changed:
                    await self.save(deploy)
                await self._sleep(deploy)
        finally:
            for task in checks.values():
                task.cancel()
            for watch in watches.values():
                watch.close()

    @staticmethod
    def _free_slots(deploy: Deploy, spec: DeploySpec, wave: Wave) -> int | None:
        """How many more hosts of the wave may start now under maxDisruptions (a
        host counts until it is synced); None: no limit."""
        if spec.max_disruptions is None:
            return None
        updating = sum(1 for name in wave.hosts
                       if deploy.hosts[name].state == HostState.UPDATING)
        return max(0, spec.max_disruptions - updating)

    async def _allow_disruption(self, deploy: Deploy, names: list[str]) -> None:
        """Give each host its once-only HighImpact allowance (before its update)."""
        def grant() -> None:
            for name in names:
                self.lease.check(deploy.id)
                try:
                    self.herd.allow_disruption(name)
                except FleetError as err:
                    log.warning("deploy %s: %s: cannot allow disruption: %s",
                                deploy.id, name, err)
                else:
                    deploy.hosts[name].disruption_granted = True
        if names:
            await asyncio.to_thread(grant)

    async def _withdraw_disruption(self, deploy: Deploy, name: str) -> None:
        """Take back an allowance the deploy gave the host and its update left
        unused (a host that needed no update, or failed)."""
        host = deploy.hosts[name]
        if host.disruption_granted:
            self.lease.check(deploy.id)
            host.disruption_granted = False
            try:
                await asyncio.to_thread(self.state.consume_disruption, name)
            except FleetError as err:
                log.warning("deploy %s: %s: cannot withdraw its disruption allowance: %s",
                            deploy.id, name, err)

    async def _start_hosts(self, deploy: Deploy, spec: DeploySpec, names: list[str],
                           slots: int | None = None) -> None:
        """Record the required image of each pending host (the first `slots` of
        them; None: all), allow it to be disrupted if the deploy may, then set the
        deploy's image (and set it again for hosts a crash caught in between)."""
        pending = [name for name in names
                   if deploy.hosts[name].state == HostState.PENDING][:slots]
        machines = await asyncio.to_thread(lambda: {name: self.mdb.get(name) for name in names})
        now = time.time()
        for name in pending:
            host, machine = deploy.hosts[name], machines[name]
            host.started_unix = now
            if machine is None:
                host.state, host.error = HostState.FAILED, "no longer in the MDB"
            elif held := self.herd.host_held(machine):
                host.state, host.error = HostState.FAILED, f"updates {held}"
            else:
                host.state, host.previous_image = HostState.UPDATING, machine.required_image
            if host.error:
                host.finished_unix = now
        if spec.allow_disruption:
            await self._allow_disruption(deploy, [
                name for name in pending if deploy.hosts[name].state == HostState.UPDATING])
        await self.save(deploy)
        writes = [name for name in names if deploy.hosts[name].state == HostState.UPDATING
                  and (machine := machines[name]) is not None
                  and machine.required_image != spec.image]
        if writes:
            def write() -> list[tuple[str, str]]:
                failed = []
                for name in writes:
                    self.lease.check(deploy.id)
                    try:
                        self.mdb.update(name, required_image=spec.image)
                    except FleetError as err:
                        failed.append((name, str(err)))
                return failed
            for name, error in await asyncio.to_thread(write):
                deploy.hosts[name].state, deploy.hosts[name].error = HostState.FAILED, error
            await self.save(deploy)

    async def _judge(self, deploy: Deploy, image: str, names: list[str], waiting: HostState,
                     deadlines: dict[str, float], watches: dict[str, HostWatch],
                     timeout: float, next_state: HostState) -> bool:
        """Move hosts in state `waiting` on: to `next_state` once the herd has them
        synced on `image`; failed on two failure verdicts of the herd, or when the
        deadline passes first. Deadlines wait while updates are disabled fleet-wide.
        Returns whether anything changed."""
        changed = False
        frozen = await asyncio.to_thread(self.state.updates_disabled)
        for name in names:
            host = deploy.hosts[name]
            if host.state != waiting:
                continue
            if frozen is not None:
                deadlines[name] += self.tick
            error = ""
            sub = self.herd.subs.get(name)
            if sub is None:
                if await asyncio.to_thread(self.mdb.get, name) is None:
                    error = "no longer in the MDB"
            else:
                watch = watches.get(name)
                if watch is None or watch.sub is not sub:
                    if watch is not None:
                        watch.close()
                    watch = watches[name] = HostWatch(sub, image)
                if sub.status in SYNCED and sub.machine.required_image == image:
                    record = await asyncio.to_thread(self.state.host, name)
                    if record.current_image == image:
                        host.state = next_state
                        if next_state != HostState.CHECKING:
                            host.finished_unix = time.time()
                        await self._withdraw_disruption(deploy, name)
                        changed = True
                        continue
                if watch.verdicts >= FAILURE_VERDICTS:
                    error = watch.last
                elif held := self.herd.host_held(sub.machine):
                    error = f"updates {held}"
            if not error and time.monotonic() > deadlines[name]:
                now = f"{sub.status.value}{': ' + sub.last_error if sub.last_error else ''}" \
                    if sub is not None else "not in the herd"
                error = f"not synced on {image} within {timeout:g} s ({now})"
            if error:
                host.state = (HostState.FAILED if waiting == HostState.UPDATING
                              else HostState.ROLLBACK_FAILED)
                if waiting == HostState.UPDATING:
                    host.error = error
                else:
                    host.rollback = error
                host.finished_unix = time.time()
                await self._withdraw_disruption(deploy, name)
                changed = True
        return changed

    async def _check(self, spec: DeploySpec, name: str) -> tuple[bool, str]:
        assert spec.health is not None
        sub = self.herd.subs.get(name)
        machine = sub.machine if sub is not None else Machine(name)
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=True)
        async with self._health_slots:
            return await spec.health.run(machine, self._client, self._health_checks)

    async def _rollback(self, deploy: Deploy, spec: DeploySpec) -> None:
        """Give every host the deploy set its previous required image back (unless
        someone changed it since), wait until they hold it, and end."""
        image = spec.image
        targets = [name for name, host in deploy.hosts.items()
                   if host.previous_image is not None and host.previous_image != image
                   and host.state not in (HostState.ROLLED_BACK, HostState.ROLLBACK_FAILED)]
        if targets:
            def revert() -> dict[str, str]:
                outcome = {}
                for name in targets:
                    host = deploy.hosts[name]
                    machine = self.mdb.get(name)
                    if machine is None:
                        outcome[name] = "gone from the MDB"
                    elif machine.required_image not in (image, host.previous_image):
                        outcome[name] = (f"left alone: its required image is now "
                                         f"{machine.required_image or 'none'}")
                    else:
                        self.lease.check(deploy.id)
                        self.mdb.update(name, required_image=host.previous_image)
                        outcome[name] = ""
                return outcome
            for name, note in (await asyncio.to_thread(revert)).items():
                host = deploy.hosts[name]
                if note:
                    host.state, host.rollback = HostState.ROLLBACK_FAILED, note
                elif host.previous_image == "":
                    host.state = HostState.ROLLED_BACK
                    host.rollback = "required image cleared (it had none); files left as they are"
                else:
                    host.state = HostState.ROLLING_BACK
            if spec.allow_disruption:
                await self._allow_disruption(deploy, [
                    name for name in targets
                    if deploy.hosts[name].state == HostState.ROLLING_BACK])
            await self.save(deploy)
        waiting = [name for name, host in deploy.hosts.items()
                   if host.state == HostState.ROLLING_BACK]
        by_image: dict[str, list[str]] = {}
        for name in waiting:
            by_image.setdefault(deploy.hosts[name].previous_image or "", []).append(name)
        deadlines = {name: time.monotonic() + spec.wave_timeout for name in waiting}
        watches: dict[str, HostWatch] = {}
        try:
            while any(deploy.hosts[name].state == HostState.ROLLING_BACK for name in waiting):
                changed = False
                for previous, names in by_image.items():
                    changed |= await self._judge(deploy, previous, names, HostState.ROLLING_BACK,
                                                 deadlines, watches, spec.wave_timeout,
                                                 HostState.ROLLED_BACK)
                if changed:
                    await self.save(deploy)
                else:
                    await self._sleep(deploy)
        finally:
            for watch in watches.values():
                watch.close()
        rolled = sum(1 for host in deploy.hosts.values() if host.state == HostState.ROLLED_BACK)
        stuck = [name for name, host in deploy.hosts.items()
                 if host.state == HostState.ROLLBACK_FAILED]
        reason = f"{deploy.reason}; rolled back {rolled} host(s)"
        if stuck:
            reason += f", rollback incomplete on {', '.join(stuck[:10])}"
        await self.finish(deploy, DeployStatus(deploy.ending or DeployStatus.TERMINAL), reason)
