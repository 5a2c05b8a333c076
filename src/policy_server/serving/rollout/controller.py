"""Rollouts: a candidate version earns its traffic step by step, on evidence.

The controller is an observer. It reads what the decision log writes (decisions with the
allocation probability they were routed with, rewards, episode ends), from whichever
protocol made them, and the outcome of each routed request (for the guardrails); it changes
traffic only through the policy manager, the way an admin's traffic change does, so under
`--workers` the change reaches every worker through the shared admin state.

Each worker folds what its own log wrote into the rollout's shared record (`Ledger`) in one
transaction per tick; the tick's work is proportional to what arrived since the last one,
never to the log. The decision rule (`rollout_rule.decide`) is checked after every unit.

States: `offline_gate` (no candidate traffic; the candidate is evaluated off-policy on the
incumbent's logged decisions until their effective sample size reaches
`rollout_offline_ess`), `canary` (the candidate has `steps[step]` percent), and the final
`promoted`, `rolled_back`, `rejected`, `held` and `aborted`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from policy_server.errors import FieldError, InvalidRequest, PolicyLoadError, PolicyServerError
from policy_server.experience.candidate import PolicyCandidate
from policy_server.experience.evaluation import paired_evaluation
from policy_server.experience.log import DecisionLog
from policy_server.experience.sequences import asymptotic_bounds
from policy_server.loading.rollout_spec import RolloutSpec
from policy_server.metrics import Metrics
from policy_server.serving.lifecycle import PolicyManager
from policy_server.serving.registry import PolicyRegistry, PolicyVersion, State
from policy_server.serving.rollout.ledger import Ledger, Unit
from policy_server.serving.rollout.rule import (
    ACTIVE,
    Evidence,
    Transition,
    alpha_split,
    decide,
    weight_after,
)
from policy_server.serving.service import PredictionEvent
from policy_server.settings import Settings

logger = logging.getLogger(__name__)

_TRACE_FIELDS = ("at", "rewarded", "estimate", "lower", "upper", "weight")
TICK_S = 0.2
INBOX_LIMIT = 200_000
SWEEP_S = 1.0
GATE_INTERVAL_S = 5.0
GATE_LEASE_S = 300.0


class RolloutConflict(PolicyServerError):
    status_code = 409
    code = "rollout_conflict"


class RolloutNotFound(PolicyServerError):
    status_code = 404
    code = "rollout_not_found"


class RolloutController:
    """One per worker process; every worker's controller shares the same `Ledger`."""

    def __init__(
        self,
        registry: PolicyRegistry,
        manager: PolicyManager,
        settings: Settings,
        metrics: Metrics,
        log: DecisionLog | None,
    ) -> None:
        self.registry = registry
        self.manager = manager
        self.settings = settings
        self.metrics = metrics
        self.log = log
        self.ledger = Ledger(log.directory) if log is not None else None
        # What arrived since the last tick: the log's records (written by its thread) and
        # routed requests' outcomes (from the event loop). deque appends are atomic.
        # Bounded: a controller that falls behind drops the oldest, whatever the version
        # (so nothing is biased); a decision dropped is a unit never assigned, a reward
        # dropped leaves its unit missing.
        self._inbox: deque[tuple[str, Any]] = deque(maxlen=INBOX_LIMIT)
        self._canary: frozenset[str] = frozenset()  # policies whose rollout is in canary
        self._watching = False  # any rollout active: the log's records are wanted
        self._task: asyncio.Task[None] | None = None
        self._gate: asyncio.Task[None] | None = None
        self._applied: dict[str, dict[str, Any]] = {}
        self._spawned: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        if log is not None:
            log.committed.append(self._on_commit)
        manager.on_change.append(self._on_reload)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.ledger is None:
            return
        await asyncio.to_thread(self._refresh)
        for policy, record in (await asyncio.to_thread(self.ledger.records)).items():
            if record.get("restore", True):
                await self._follow(policy, record)
        await self._start_configured()
        self._task = asyncio.create_task(self._run(), name="rollout-controller")
        self._gate = asyncio.create_task(self._run_gate(), name="rollout-offline-gate")

    def close(self) -> None:
        """After the decision log closed: what it wrote last still counts."""
        for task in (self._task, self._gate):
            if task is not None:
                task.cancel()
        if self.ledger is not None:
            try:
                self._tick()
            except Exception:  # shutting down: the record keeps what earlier ticks folded
                logger.exception("the rollout controller's last tick failed")
            self.ledger.close()

    # --- the resource: start, read, abort ---------------------------------------------------

    def require_log(self) -> Ledger:
        if self.ledger is None:
            raise RolloutConflict(
                "a rollout needs the decision log: start the server with --decision-log DIR"
            )
        return self.ledger

    async def begin(self, policy: str, spec: RolloutSpec) -> dict[str, Any]:
        ledger = self.require_log()
        entry = self.registry.entry(policy)
        _refuse_second(policy, await asyncio.to_thread(ledger.get, policy))
        incumbent = self._incumbent(policy)
        _check_versions(entry.versions, spec, incumbent)
        for field, message in spec.problems():
            raise InvalidRequest(f"invalid request: {field}", [FieldError(field, message)])
        settings = entry.settings
        low, high = settings.rollout_reward_range
        state = "offline_gate" if spec.offline_gate else "canary"
        now = time.time()
        record = {
            "id": uuid.uuid4().hex,
            "policy": policy,
            "spec": spec.model_dump(),
            "state": state,
            "candidate": spec.candidate,
            "incumbent": incumbent,
            "step": 0,
            "weight": weight_after(spec, state, 0),
            "started_at": now,
            "reward_range": [low, high],
            "reward_cutoff_s": settings.rollout_reward_cutoff_s,
            "history": [{"at": now, "from": None, "to": state, "reason": "started"}],
            "gate_until": 0.0,
        }
        evidence = Evidence(spec, low, high)

        def write() -> None:
            with ledger.transaction():
                known = ledger.get(policy)
                _refuse_second(policy, known)
                if known is not None:
                    ledger.forget_units(known[0]["id"])
                ledger.put(policy, record, evidence.to_state())

        await asyncio.to_thread(write)
        await self._transitioned(policy, record, evidence)
        return self.document(policy, record, evidence)

    async def read(self, policy: str) -> dict[str, Any]:
        ledger = self.require_log()
        self.registry.entry(policy)
        found = await asyncio.to_thread(ledger.get, policy)
        if found is None:
            raise RolloutNotFound(f"policy {policy!r} has no rollout")
        record, state = found
        spec = RolloutSpec.model_validate(record["spec"])
        low, high = record["reward_range"]
        return self.document(policy, record, Evidence.from_state(spec, low, high, state))

    async def abort(self, policy: str, reason: str) -> dict[str, Any]:
        self.require_log()
        self.registry.entry(policy)
        result = await asyncio.to_thread(self._finish, policy, "aborted", reason, None)
        if result is None:
            raise RolloutNotFound(f"policy {policy!r} has no rollout")
        record, evidence = result
        await self._transitioned(policy, record, evidence)
        return self.document(policy, record, evidence)

    async def take_over_traffic(self, policy: str) -> None:
        """An admin sets the policy's traffic: refused while a rollout runs (it owns the
        weights); afterwards, the finished rollout's weights are no longer restored at
        start-up."""
        if self.ledger is None:
            return
        ledger = self.ledger

        def release() -> None:
            with ledger.transaction():
                found = ledger.get(policy)
                if found is None:
                    return
                record, state = found
                if record["state"] in ACTIVE:
                    raise RolloutConflict(
                        f"policy {policy!r} has a rollout in state {record['state']!r} that "
                        f"sets its traffic; DELETE /admin/policies/{policy}/rollout first"
                    )
                record["restore"] = False
                ledger.put(policy, record, state)

        await asyncio.to_thread(release)

    def _finish(
        self, policy: str, to: str, reason: str, rollout_id: str | None
    ) -> tuple[dict[str, Any], Evidence] | None:
        """Move an active (or held) rollout to a final state in one transaction."""
        assert self.ledger is not None
        with self.ledger.transaction():
            found = self.ledger.get(policy)
            if found is None:
                return None
            record, state = found
            spec = RolloutSpec.model_validate(record["spec"])
            evidence = _evidence(spec, record, state)
            if rollout_id is not None and record["id"] != rollout_id:
                return None
            if record["state"] in ACTIVE or record["state"] == "held":
                _move(record, evidence, Transition(to, reason))
                self.ledger.put(policy, record, evidence.to_state())
                self.ledger.forget_units(record["id"])
        return record, evidence

    def _incumbent(self, policy: str) -> str:
        entry = self.registry.entry(policy)
        ready = [v for v in entry.ordered() if v.state is State.READY]
        holders = [v for v in ready if entry.weight_of(v) >= 100.0 - 1e-9]
        if not holders:
            raise RolloutConflict(
                f"policy {policy!r}: no version has all the traffic, so there is no "
                "incumbent; give one version all of it first (PUT /admin/policies/"
                f"{policy}/traffic)"
            )
        return holders[0].version

    # --- what a person sees -----------------------------------------------------------------

    def document(self, policy: str, record: dict[str, Any], evidence: Evidence) -> dict[str, Any]:
        spec = RolloutSpec.model_validate(record["spec"])
        candidate, incumbent = record["candidate"], record["incumbent"]
        estimate, lower, upper = evidence.bounds()
        split = alpha_split(spec)
        spent = split["offline"] if evidence.offline is not None else 0.0
        if record["state"] != "offline_gate" and any(
            h["to"] == "canary" for h in record["history"]
        ):
            spent += sum(a for name, a in split.items() if name != "offline")

        def by_version(counts: Any) -> dict[str, int]:
            return {candidate: counts.candidate, incumbent: counts.incumbent}

        requests = by_version(evidence.requests)
        failed = by_version(evidence.failed)
        return {
            "policy": policy,
            "id": record["id"],
            "state": record["state"],
            "candidate": candidate,
            "incumbent": incumbent,
            "weight": record["weight"],
            "step": record["step"],
            "spec": record["spec"],
            "started_at": record["started_at"],
            "evidence": {
                "units": by_version(evidence.units),
                "rewarded": by_version(evidence.rewarded),
                "missing": by_version(evidence.missing),
                "switched": evidence.switched,
                "clipped": evidence.clipped,
                "step_rewarded": evidence.step_rewarded,
                "estimate": estimate,
                "lower": lower if evidence.value.n else None,
                "upper": upper if evidence.value.n else None,
                "alpha": spec.alpha,
                "alpha_split": split,
                "alpha_spent": spent,
                "sequence": "hedged betting confidence sequence (Waudby-Smith & Ramdas "
                "2024) on inverse-propensity-weighted differences",
                "effective_sample_size": (evidence.offline or {}).get("effective_sample_size"),
                "reward_range": record["reward_range"],
                "reward_cutoff_s": record["reward_cutoff_s"],
                "guardrails": {
                    "error_rate_increase": None
                    if evidence.errors is None
                    else {
                        "requests": requests,
                        "errors": failed,
                        "lower": evidence.errors.lower if evidence.errors.n else None,
                        "upper": evidence.errors.upper if evidence.errors.n else None,
                    },
                    "p99_latency_ratio": None
                    if evidence.latency is None
                    else {
                        "reference_s": evidence.latency_reference,
                        "slow_share_lower": evidence.latency.lower if evidence.latency.n else None,
                        "judged": evidence.latency.n,
                    },
                },
                "offline": evidence.offline,
                "trace": [dict(zip(_TRACE_FIELDS, point, strict=True)) for point in evidence.trace],
            },
            "history": record["history"],
        }

    # --- observing -------------------------------------------------------------------------

    async def observe(self, event: PredictionEvent) -> None:
        """A routed request's outcome, for the guardrails (an observer of the service)."""
        version = event.version
        if version.name in self._canary and not event.pinned:
            self._request_seen(version, False, event.elapsed_s)

    def failed(self, version: PolicyVersion, pinned: bool, elapsed_s: float) -> None:
        """A routed request the version could not answer (time-out, broken output)."""
        if version.name in self._canary and not pinned:
            self._request_seen(version, True, elapsed_s)

    def _request_seen(self, version: PolicyVersion, failed: bool, elapsed_s: float) -> None:
        # The allocation now, when it was routed, not when a tick folds it.
        allocation = self.registry.allocation(version)
        if allocation is not None:
            self._inbox.append(("request", (version, allocation, failed, elapsed_s)))

    def _on_commit(self, records: Sequence[Mapping[str, Any]]) -> None:
        """The decision log's writer thread, after each group it wrote."""
        if not self._watching:
            return
        for record in records:
            kind = record.get("type")
            if kind == "decision":
                if record.get("allocation") is not None and record["policy"] in self._canary:
                    self._inbox.append(("decision", record))
            elif kind in ("reward", "episode_end"):
                self._inbox.append((kind, record))

    def _on_reload(self) -> None:
        """A reload that removed the candidate or the incumbent aborts the rollout; one
        that found a new `rollout:` entry starts it."""
        if self.ledger is None or self._task is None:
            return
        self._spawn(self._start_configured())
        if not self._watching:
            return
        for policy, record in list(self._applied.items()):
            if record["state"] not in ACTIVE:
                continue
            try:
                versions = self.registry.entry(policy).versions
            except PolicyServerError:
                versions = {}
            for role in ("candidate", "incumbent"):
                if record[role] not in versions:
                    reason = f"the {role} version {record[role]!r} was removed by a reload"
                    self._spawn(self._abort_quietly(policy, reason))
                    break

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    async def _start_configured(self) -> None:
        """The `rollout:` entries of repository.yaml: each starts once, when the policy has
        no rollout of that spec yet (so neither a restart nor a finished rollout starts it
        again)."""
        assert self.ledger is not None
        records = await asyncio.to_thread(self.ledger.records)
        for policy, config in self.manager.config.policies.items():
            spec = config.rollout
            known = records.get(policy)
            if spec is None or (known is not None and known["spec"] == spec.model_dump()):
                continue
            try:
                await self.begin(policy, spec)
            except RolloutConflict as error:
                current = await asyncio.to_thread(self.ledger.get, policy)
                if current is None or current[0]["spec"] != spec.model_dump():
                    logger.error("repository.yaml: policies.%s.rollout: %s", policy, error.message)
            except PolicyServerError as error:
                logger.error("repository.yaml: policies.%s.rollout: %s", policy, error.message)

    async def _abort_quietly(self, policy: str, reason: str) -> None:
        try:
            await self.abort(policy, reason)
        except PolicyServerError as error:
            logger.warning("rollout of %s: %s", policy, error)

    # --- the tick --------------------------------------------------------------------------

    async def _run(self) -> None:
        next_sweep = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            try:
                sweep = time.monotonic() >= next_sweep
                if sweep:
                    next_sweep = time.monotonic() + SWEEP_S
                changed = await asyncio.to_thread(self._tick, sweep)
                for policy, record, evidence in changed:
                    await self._transitioned(policy, record, evidence)
                if sweep:
                    await asyncio.to_thread(self._refresh)
            except Exception:  # the controller must outlive any one failed tick
                logger.exception("the rollout controller's tick failed")

    def _refresh(self) -> None:
        """Which policies have a rollout under way (one cheap read), and follow a transition
        another worker made; the gauges show the record whichever worker made it."""
        assert self.ledger is not None
        records = self.ledger.records()
        self._canary = frozenset(p for p, r in records.items() if r["state"] == "canary")
        self._watching = any(r["state"] in ACTIVE for r in records.values())
        for policy, record in records.items():
            known = self._applied.get(policy)
            if known is None or (known["id"], known["state"], known["step"]) != (
                record["id"],
                record["state"],
                record["step"],
            ):
                self._applied[policy] = record
                self.metrics.rollout_state(policy, record["state"], record["weight"])

    def _tick(self, sweep: bool = True) -> list[tuple[str, dict[str, Any], Evidence]]:
        """Fold what arrived into the shared evidence; the rollouts that changed state."""
        assert self.ledger is not None
        items = []
        while self._inbox:
            items.append(self._inbox.popleft())
        if not items and not (sweep and self._watching):
            return []
        with self._lock, self.ledger.transaction():
            rollouts = {
                policy: _Active(policy, record, evidence)
                for policy, record, evidence in self.ledger.rollouts()
                if record["state"] in ACTIVE
            }
            if not rollouts:
                return []
            by_id = {r.record["id"]: r for r in rollouts.values()}
            for kind, item in items:
                if kind == "decision":
                    self._decision(rollouts.get(item["policy"]), item)
                elif kind == "reward":
                    self._reward(by_id, item)
                elif kind == "episode_end":
                    self._episode_end(by_id, item)
                else:
                    self._request(rollouts.get(item[0].name), *item)
            if sweep:
                now = time.time()
                for active in rollouts.values():
                    self._sweep(active, now)
            changed = []
            for active in rollouts.values():
                if active.dirty:
                    active.evidence.mark(time.time(), active.record["weight"], active.moved)
                    self.ledger.put(active.policy, active.record, active.evidence.to_state())
                    self.metrics.rollout_value(active.policy, *active.evidence.bounds())
                if active.moved:
                    if active.record["state"] not in ACTIVE:
                        self.ledger.forget_units(active.record["id"])
                    changed.append((active.policy, active.record, active.evidence))
        for policy, record, evidence in changed:
            self._publish(policy, record, evidence)
        return changed

    def _decision(self, active: _Active | None, record: Mapping[str, Any]) -> None:
        if active is None or active.record["state"] != "canary":
            return
        version = record["version"]
        candidate = version == active.record["candidate"]
        if not candidate and version != active.record["incumbent"]:
            return
        allocation = float(record["allocation"])
        if not 0.0 < allocation < 1.0:
            return  # one version had all the traffic: not assigned at random
        assert self.ledger is not None
        spec = active.spec
        episode = record.get("episode_id")
        name = episode if spec.unit == "episode" and episode else str(record["decision_id"])
        rollout = active.record["id"]
        unit = self.ledger.unit(rollout, name)
        at = float(record["time"])
        if unit is None:
            unit = Unit(rollout, name, candidate, allocation, 0.0, 0, 0, at, False, False)
            active.evidence.assigned(candidate)
        elif not self.ledger.is_open(rollout, name):
            return  # a closed episode's id used again: not the same unit
        else:
            # Rendezvous hashing moves episodes only toward the version whose weight grew:
            # the chance the unit stayed on its version is the smallest allocation it had.
            unit.switched |= unit.candidate != candidate
            unit.own_p = min(unit.own_p, allocation)
            unit.last = max(unit.last, at)
        unit.decisions += 1
        self.ledger.save_unit(unit)
        self.ledger.add_decision(str(record["decision_id"]), rollout, name)
        active.dirty = True

    def _reward(self, by_id: dict[str, _Active], record: Mapping[str, Any]) -> None:
        assert self.ledger is not None
        target = self.ledger.reward_target(str(record["decision_id"]))
        if target is None:
            return
        rollout, name, had_reward = target
        active = by_id.get(rollout)
        if active is None or not self.ledger.is_open(rollout, name):
            return  # late: its unit was already counted or counted missing
        unit = self.ledger.unit(rollout, name)
        assert unit is not None
        unit.total += float(record["reward"])
        unit.rewarded += 0 if had_reward else 1
        unit.last = max(unit.last, float(record["time"]))
        if record.get("terminated") or record.get("truncated"):
            unit.ended = True  # as the exports read it: the episode ends at this step
        self._close_if_complete(active, unit)

    def _episode_end(self, by_id: dict[str, _Active], record: Mapping[str, Any]) -> None:
        assert self.ledger is not None
        for unit in self.ledger.units_named(str(record["episode_id"])):
            active = by_id.get(unit.rollout)
            if active is None or active.spec.unit != "episode":
                continue
            unit.ended = True
            self._close_if_complete(active, unit)

    def _close_if_complete(self, active: _Active, unit: Unit) -> None:
        """A decision counts at its first reward; an episode once ended with every decision
        rewarded. Otherwise the unit stays open (saved)."""
        assert self.ledger is not None
        complete = unit.rewarded >= 1 if active.spec.unit == "decision" else False
        if active.spec.unit == "episode":
            complete = unit.ended and unit.rewarded >= unit.decisions
        if not complete:
            self.ledger.save_unit(unit)
            active.dirty = True
            return
        self._count(active, unit)

    def _count(self, active: _Active, unit: Unit) -> None:
        assert self.ledger is not None
        self.ledger.save_unit(unit, open_=False)
        active.dirty = True
        if active.record["state"] != "canary":
            return
        evidence = active.evidence
        if unit.switched:
            evidence.switched += 1
        elif unit.rewarded < max(unit.decisions, 1):
            evidence.add_missing(unit.candidate)
        else:
            evidence.add_unit(unit.candidate, unit.p, unit.total)
            self._check(active)

    def _sweep(self, active: _Active, now: float) -> None:
        """Units without activity for the cutoff close: an episode whose rewards stopped
        counts when every decision has its reward; anything else is missing."""
        assert self.ledger is not None
        cutoff = float(active.record["reward_cutoff_s"])
        for unit in self.ledger.stale(active.record["id"], now - cutoff):
            self._count(active, unit)

    def _request(
        self,
        active: _Active | None,
        version: PolicyVersion,
        allocation: float,
        failed: bool,
        elapsed: float,
    ) -> None:
        if active is None or active.record["state"] != "canary":
            return
        candidate = version.version == active.record["candidate"]
        if not candidate and version.version != active.record["incumbent"]:
            return
        if not 0.0 < allocation < 1.0:
            return
        p = allocation if candidate else 1.0 - allocation
        active.evidence.add_request(candidate, p, failed, elapsed)
        active.dirty = True
        self._check(active)

    def _check(self, active: _Active) -> None:
        record = active.record
        transition = decide(active.spec, record["state"], record["step"], active.evidence)
        if transition is not None:
            _move(record, active.evidence, transition)
            active.moved = True

    # --- the offline gate ------------------------------------------------------------------

    async def _run_gate(self) -> None:
        while True:
            try:
                changed = await asyncio.to_thread(self._gate_once)
                for policy, record, evidence in changed:
                    await self._transitioned(policy, record, evidence)
            except Exception:
                logger.exception("the rollout's offline gate failed")
            await asyncio.sleep(GATE_INTERVAL_S)

    def _gate_once(self) -> list[tuple[str, dict[str, Any], Evidence]]:
        assert self.ledger is not None
        changed = []
        for policy, record in self.ledger.records().items():
            if record["state"] != "offline_gate" or not self._claim_gate(policy, record["id"]):
                continue
            offline = self._evaluate_offline(policy, record)
            moved = self._gate_result(policy, record["id"], offline)
            if moved is not None:
                self._publish(policy, *moved)
                changed.append((policy, *moved))
        return changed

    def _gate_result(
        self, policy: str, rollout_id: str, offline: dict[str, Any]
    ) -> tuple[dict[str, Any], Evidence] | None:
        """Record the offline evidence; the record and evidence when the gate decided."""
        assert self.ledger is not None
        with self.ledger.transaction():
            found = self.ledger.get(policy)
            if found is None or found[0]["id"] != rollout_id:
                return None
            record, state = found
            if record["state"] != "offline_gate":
                return None
            spec = RolloutSpec.model_validate(record["spec"])
            evidence = _evidence(spec, record, state)
            evidence.offline = offline
            record["gate_until"] = 0.0
            transition = _gate_transition(offline, self._ess_needed(policy))
            if transition is not None:
                _move(record, evidence, transition)
            self.ledger.put(policy, record, evidence.to_state())
        return None if transition is None else (record, evidence)

    def _ess_needed(self, policy: str) -> float:
        return float(self.registry.entry(policy).settings.rollout_offline_ess)

    def _claim_gate(self, policy: str, rollout_id: str) -> bool:
        """One worker evaluates at a time: it holds a lease in the record."""
        assert self.ledger is not None
        with self.ledger.transaction():
            found = self.ledger.get(policy)
            if found is None or found[0]["id"] != rollout_id:
                return False
            record, state = found
            if record["gate_until"] > time.time():
                return False
            record["gate_until"] = time.time() + GATE_LEASE_S
            self.ledger.put(policy, record, state)
        return True

    def _evaluate_offline(self, policy: str, record: dict[str, Any]) -> dict[str, Any]:
        """The candidate on the incumbent's logged, rewarded decisions (our `evaluate`'s
        doubly robust estimator), the paired difference's asymptotic confidence sequence."""
        assert self.log is not None
        spec = RolloutSpec.model_validate(record["spec"])
        alpha = alpha_split(spec)["offline"]
        version = self.registry.entry(policy).versions.get(record["candidate"])
        if version is None or version.policy is None:
            return {"error": f"candidate {record['candidate']!r} is not loaded"}
        evaluation = paired_evaluation(
            Path(self.log.directory),
            PolicyCandidate(version.policy),
            policy=policy,
            version=record["incumbent"],
        )
        if evaluation is None:
            return {"episodes": 0, "effective_sample_size": 0.0, "alpha": alpha}
        estimate, lower, upper = asymptotic_bounds(
            evaluation.differences, alpha, self._ess_needed(policy)
        )
        finite = math.isfinite(lower) and math.isfinite(upper)
        return {
            "estimator": evaluation.estimator,
            "episodes": len(evaluation.differences),
            "effective_sample_size": evaluation.ess,
            "candidate_value": float(evaluation.candidate.mean()),
            "incumbent_value": float(evaluation.logged.mean()),
            "estimate": estimate,
            "lower": lower if finite else None,
            "upper": upper if finite else None,
            "alpha": alpha,
            "sequence": "asymptotic confidence sequence (Waudby-Smith et al. 2024)",
            "at": time.time(),
        }

    # --- transitions: log, metrics, traffic --------------------------------------------------

    def _publish(self, policy: str, record: dict[str, Any], evidence: Evidence) -> None:
        """In the thread that made the transition: the log line and the gauges."""
        last = record["history"][-1]
        estimate, lower, upper = evidence.bounds()
        logger.info(
            "rollout of %s: %s -> %s: %s",
            policy,
            last["from"],
            last["to"],
            last["reason"],
            extra={
                "event": "rollout_transition",
                "policy": policy,
                "candidate": record["candidate"],
                "incumbent": record["incumbent"],
                "from_state": last["from"],
                "to_state": last["to"],
                "weight": record["weight"],
                "step": record["step"],
                "estimate": estimate,
                "lower": lower,
                "upper": upper,
                "rewarded": evidence.rewarded.total,
            },
        )
        self.metrics.rollout_transition(policy, record["state"], record["weight"])
        self.metrics.rollout_value(policy, estimate, lower, upper)

    async def _transitioned(self, policy: str, record: dict[str, Any], evidence: Evidence) -> None:
        """On the event loop: the weights that follow the new state, through the manager."""
        self._applied[policy] = record
        self._canary = (
            self._canary | {policy} if record["state"] == "canary" else self._canary - {policy}
        )
        self._watching = self._watching or record["state"] in ACTIVE
        self.metrics.rollout_state(policy, record["state"], record["weight"])
        await self._follow(policy, record)

    async def _follow(self, policy: str, record: dict[str, Any]) -> None:
        traffic = _traffic(record)
        if traffic is None:
            return
        try:
            entry = self.registry.entry(policy)
            missing = [v for v in traffic if v not in entry.versions]
            if missing:
                return
            if entry.traffic == traffic:
                return
            await self.manager.set_traffic(policy, traffic, entry.shadow)
        except (PolicyLoadError, PolicyServerError) as error:
            logger.warning("rollout of %s: cannot set its traffic: %s", policy, error)
            return
        self.manager.changed()


class _Active:
    """A rollout being folded in one tick."""

    def __init__(self, policy: str, record: dict[str, Any], state: dict[str, Any]) -> None:
        self.policy = policy
        self.record = record
        self.spec = RolloutSpec.model_validate(record["spec"])
        self.evidence = _evidence(self.spec, record, state)
        self.dirty = False
        self.moved = False


def _refuse_second(policy: str, known: tuple[dict[str, Any], dict[str, Any]] | None) -> None:
    if known is not None and known[0]["state"] in ACTIVE:
        raise RolloutConflict(
            f"policy {policy!r} already has a rollout in state {known[0]['state']!r} "
            f"(candidate {known[0]['candidate']!r}); DELETE it first"
        )


def _evidence(spec: RolloutSpec, record: dict[str, Any], state: dict[str, Any]) -> Evidence:
    low, high = record["reward_range"]
    return Evidence.from_state(spec, float(low), float(high), state)


def _move(record: dict[str, Any], evidence: Evidence, transition: Transition) -> None:
    spec = RolloutSpec.model_validate(record["spec"])
    before = record["state"]
    record["state"] = transition.to
    if transition.step is not None:
        record["step"] = transition.step
        evidence.step_rewarded = 0
    record["weight"] = (
        record["weight"]
        if transition.to == "held"
        else weight_after(spec, transition.to, record["step"])
    )
    record["history"].append(
        {"at": time.time(), "from": before, "to": transition.to, "reason": transition.reason}
    )


def _gate_transition(offline: dict[str, Any], ess_needed: float) -> Transition | None:
    if offline.get("effective_sample_size", 0.0) < ess_needed or offline.get("upper") is None:
        return None
    if offline["upper"] < 0.0:
        return Transition(
            "rejected",
            f"offline gate: the candidate's value is below the incumbent's (upper bound of "
            f"the difference {offline['upper']:.4g}, ESS {offline['effective_sample_size']:.0f})",
        )
    return Transition(
        "canary",
        f"offline gate passed (difference in [{offline['lower']:.4g}, {offline['upper']:.4g}], "
        f"ESS {offline['effective_sample_size']:.0f})",
        0,
    )


def _traffic(record: dict[str, Any]) -> dict[str, float] | None:
    weight = float(record["weight"])
    candidate, incumbent = record["candidate"], record["incumbent"]
    if weight >= 100.0:
        return {candidate: 100.0}
    if weight <= 0.0:
        return {incumbent: 100.0}
    return {incumbent: 100.0 - weight, candidate: weight}


def _check_versions(
    versions: Mapping[str, PolicyVersion], spec: RolloutSpec, incumbent: str
) -> None:
    found = versions.get(spec.candidate)
    if found is None:
        raise InvalidRequest(
            f"invalid request: candidate: no version {spec.candidate!r}; it has {sorted(versions)}",
            [FieldError("candidate", f"no version {spec.candidate!r}")],
        )
    if found.state is not State.READY:
        raise InvalidRequest(
            f"invalid request: candidate: version {spec.candidate!r} is {found.state.value}",
            [FieldError("candidate", f"version {spec.candidate!r} is {found.state.value}")],
        )
    if spec.candidate == incumbent:
        raise InvalidRequest(
            f"invalid request: candidate: {spec.candidate!r} is the incumbent (it has all "
            "the traffic already)",
            [FieldError("candidate", "is the incumbent")],
        )
