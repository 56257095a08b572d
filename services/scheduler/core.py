"""Job lifecycle and the round loop. Never touches tensors.

A job moves queued -> running -> succeeded | failed | cancelled. Each round: sample
clients (seeded), publish one task per client, wait for the aggregator's "merged"
events, then ask it to close the round when every update is in, or at the deadline
when the quorum is. All state lives in the store, with absolute deadlines, so a
restarted scheduler picks up where the last one stopped; messages it may have sent
twice are harmless because every step it asks for is idempotent.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from shared.bus import Bus, Queues
from shared.jobs import JobNotFound, JobState, read_spec, read_state
from shared.messages import (
    ClientEvaluated,
    CloseRound,
    DropJob,
    EvaluateTask,
    InitJob,
    JobFailed,
    JobInitialized,
    MoreWork,
    RoundCommitted,
    TrainTask,
    UpdateMerged,
    decode_scheduler,
    encode,
)
from shared.metrics import (
    FWD_EXTRA_WAVES,
    JOBS_FINISHED,
    JOBS_RUNNING,
    JOBS_SUBMITTED,
    LATE_TASKS,
    ROUND_DURATION,
    TASKS_DISPATCHED,
)
from shared.models import model_info
from shared.seeding import derive_seed
from shared.spec import JobSpec
from shared.store import Keys, Store
from shared.wireless import (
    RoundCost,
    backprop_step_flops,
    fwd_perturbation_flops,
    max_local_steps,
    round_cost,
    round_profile,
    select_clients,
)

log = logging.getLogger(__name__)

RESEND_AFTER_S = 60.0
"""A control message with no answer after this long is sent again (they are idempotent)."""


class JobConflict(RuntimeError):
    """The request does not fit the job's state (e.g. cancelling a finished job)."""


def sample_clients(spec: JobSpec, round_: int) -> list[int]:
    """The round's clients: seeded at random, or those with the lowest expected delay or energy."""
    if spec.budget.selection != "random":
        costs = {
            client: getattr(
                expected_cost(spec, round_, client), "total_s" if spec.budget.selection == "delay" else "total_j"
            )
            for client in range(spec.num_clients)
        }
        return sorted(select_clients(costs, spec.clients_per_round))
    rng = np.random.default_rng(derive_seed("sample", spec.seed, round_))
    chosen = rng.choice(spec.num_clients, size=spec.clients_per_round, replace=False)
    return sorted(int(c) for c in chosen)


def work_flops(spec: JobSpec) -> float:
    """FLOPs of one unit of local work (a backprop step, or one perturbation) at full sequence length."""
    tokens = spec.batch_size * spec.max_length
    params = model_info(spec.model).num_params
    if spec.mode == "fwd":
        return float(fwd_perturbation_flops(params, tokens))
    return float(backprop_step_flops(params, tokens))


def full_budget(spec: JobSpec) -> int:
    return spec.fwd.perturbations_per_task if spec.mode == "fwd" else spec.local_steps


def expected_cost(spec: JobSpec, round_: int, client: int, upload_bytes: float = 0.0) -> RoundCost:
    profile = round_profile(spec.devices, spec.num_clients, spec.seed, client, round_)
    return round_cost(profile, work_flops(spec) * full_budget(spec), upload_bytes)


def task_budget(spec: JobSpec, round_: int, client: int, upload_bytes: float) -> int:
    """Local steps (or perturbations) for one device: all of it, or as much as meets the device deadline.

    Sized at full sequence length and with the previous round's upload size (0 before any), so a
    deadline budget is an upper estimate of the time a device needs; never below `budget.min_steps`.
    """
    cap = full_budget(spec)
    if spec.budget.kind == "fixed":
        return cap
    profile = round_profile(spec.devices, spec.num_clients, spec.seed, client, round_)
    fits = max_local_steps(profile, spec.budget.device_deadline_s, work_flops(spec), upload_bytes, cap)
    return max(min(spec.budget.min_steps, cap), fits)


def new_job_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "job"
    return f"{slug}-{uuid.uuid4().hex[:10]}"


class Scheduler:
    def __init__(
        self,
        bus: Bus,
        store: Store,
        namespace: str = "pwff",
        clock: Callable[[], float] = time.time,
        tick_s: float = 0.5,
    ) -> None:
        self.bus = bus
        self.store = store
        self.keys = Keys(namespace)
        self.queues = Queues(namespace)
        self.clock = clock
        self.tick_s = tick_s
        self._lock = threading.RLock()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume aggregator events, and check deadlines every `tick_s`, until `stop`."""
        JOBS_RUNNING.set(sum(1 for job in self.list_jobs() if job["state"] == JobState.RUNNING))
        ticker = threading.Thread(target=self._tick_forever, args=(stop,), name="scheduler-tick", daemon=True)
        ticker.start()
        self.bus.consume(self.queues.events, self.handle_event, stop)
        ticker.join()

    def _tick_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:
                log.exception("scheduler tick failed; trying again")

    # -- API-facing operations --------------------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        job_id = new_job_id(spec.name)
        now = self.clock()
        with self._lock:
            self.store.hash_set(
                self.keys.job(job_id),
                {
                    "spec": spec.model_dump_json(),
                    "state": JobState.QUEUED,
                    "round": "0",
                    "created_at": repr(now),
                    "updated_at": repr(now),
                    "init_sent_at": repr(now),
                    "error": "",
                },
            )
            self.store.set_add(self.keys.jobs, job_id)
        JOBS_SUBMITTED.inc()
        self.bus.publish(self.queues.aggregate, encode(InitJob(job_id=job_id)))
        log.info("job %s submitted (%s on %s, %d rounds)", job_id, spec.model, spec.dataset, spec.rounds)
        return job_id

    def cancel(self, job_id: str) -> None:
        with self._lock:
            state = read_state(self.store, self.keys, job_id)
            if state is None:
                raise JobNotFound(job_id)
            if state.final:
                raise JobConflict(f"job {job_id} already {state}")
            self._finish(job_id, JobState.CANCELLED, "")

    def get_job(self, job_id: str) -> dict[str, Any]:
        meta = self.store.hash_get_all(self.keys.job(job_id))
        if not meta:
            raise JobNotFound(job_id)
        spec = json.loads(meta["spec"])
        rounds = []
        for raw in self.store.list_range(self.keys.metrics(job_id)):
            record = msgpack.unpackb(raw)
            entry: dict[str, Any] = {"round": record["round"], "clients": record["clients"], **record["metrics"]}
            plan = self.store.hash_get_all(self.keys.round_plan(job_id, record["round"]))
            if plan.get("committed_at") and plan.get("opened_at"):
                entry["duration_s"] = float(plan["committed_at"]) - float(plan["opened_at"])
            entry.update(record.get("extra", {}))
            evaluated = self.store.hash_get_all(self.keys.client_metrics(job_id, record["round"]))
            if evaluated:
                per_client = {int(c): json.loads(m) for c, m in sorted(evaluated.items(), key=lambda i: int(i[0]))}
                entry["per_client"] = per_client
                for figure in ("global_accuracy", "personalized_accuracy"):
                    entry[f"client_mean_{figure}"] = float(np.mean([m[figure] for m in per_client.values()]))
            rounds.append(entry)
        return {
            "id": job_id,
            "name": spec.get("name", ""),
            "state": meta["state"],
            "round": int(meta.get("round", "0")),
            "rounds": spec["rounds"],
            "created_at": float(meta["created_at"]),
            "updated_at": float(meta["updated_at"]),
            "error": meta.get("error") or None,
            "spec": spec,
            "metrics": rounds,
        }

    def list_jobs(self) -> list[dict[str, Any]]:
        jobs = []
        for job_id in self.store.set_members(self.keys.jobs):
            meta = self.store.hash_get_all(self.keys.job(job_id))
            if meta:
                jobs.append(
                    {
                        "id": job_id,
                        "name": json.loads(meta["spec"]).get("name", ""),
                        "state": meta["state"],
                        "round": int(meta.get("round", "0")),
                        "created_at": float(meta["created_at"]),
                    }
                )
        return sorted(jobs, key=lambda job: job["created_at"], reverse=True)

    def model_archive(self, job_id: str, client: int | None = None) -> bytes | None:
        """The published PEFT folder (tar.gz) of the global model or of one client's model."""
        spec = read_spec(self.store, self.keys, job_id)
        if client is None:
            return self.store.get(self.keys.model_archive(job_id, "global"))
        if not 0 <= client < spec.num_clients:
            raise ValueError(f"client {client} out of range: the job has {spec.num_clients} clients")
        return self.store.get(self.keys.model_archive(job_id, f"client-{client}"))

    # -- events from the aggregator ---------------------------------------------------------

    def handle_event(self, body: bytes) -> None:
        event = decode_scheduler(body)
        with self._lock:
            state = read_state(self.store, self.keys, event.job_id)
            if state is None:
                log.warning("event %s for unknown job %s ignored", event.type, event.job_id)
                return
            if isinstance(event, JobFailed):
                if not state.final:
                    self._finish(event.job_id, JobState.FAILED, event.error)
                return
            if state.final:
                return  # e.g. a round that committed after the job was cancelled
            if isinstance(event, JobInitialized):
                if state == JobState.QUEUED:
                    self._set(event.job_id, state=JobState.RUNNING)
                    JOBS_RUNNING.inc()
                    self._open_round(event.job_id, 1)
            elif isinstance(event, UpdateMerged):
                self._on_merged(event)
            elif isinstance(event, MoreWork):
                self._on_more_work(event)
            elif isinstance(event, ClientEvaluated):
                self._on_client_evaluated(event)
            elif isinstance(event, RoundCommitted):
                self._on_committed(event)

    def _on_merged(self, event: UpdateMerged) -> None:
        plan = self.store.hash_get_all(self.keys.round_plan(event.job_id, event.round))
        if plan.get("status") != "open":
            return
        if event.merged_count >= int(plan["expected"]):
            self._close_round(event.job_id, event.round)

    def _on_more_work(self, event: MoreWork) -> None:
        """fwd variance control: another wave of perturbations for the same step."""
        job_id, round_ = event.job_id, event.round
        plan_key = self.keys.round_plan(job_id, round_)
        plan = self.store.hash_get_all(plan_key)
        if plan.get("status") != "closing" or int(plan.get("wave", "0")) >= event.wave:
            return  # a repeated event, or the round moved on
        spec = read_spec(self.store, self.keys, job_id)
        clients = json.loads(plan["clients"])
        per_task = spec.fwd.perturbations_per_task
        count = min(len(clients), (spec.fwd.max_perturbations_per_step - event.perturbations) // per_task)
        if count <= 0:
            self._close_round(job_id, round_, force=True)
            return
        # Rotate through the round's clients so a partial wave does not always land on the same ones.
        start = (event.wave * count) % len(clients)
        chosen = [clients[(start + i) % len(clients)] for i in range(count)]
        now = self.clock()
        self.store.hash_set(
            plan_key,
            {
                "status": "open",
                "wave": str(event.wave),
                "expected": str(int(plan["expected"]) + count),
                "deadline_at": repr(now + spec.round_deadline_s),
            },
        )
        self._dispatch(spec, job_id, round_, chosen, event.wave)
        FWD_EXTRA_WAVES.inc()
        log.info(
            "job %s round %d: variance %.3g after %d perturbations; wave %d to clients %s",
            job_id,
            round_,
            event.variance,
            event.perturbations,
            event.wave,
            chosen,
        )

    def _on_committed(self, event: RoundCommitted) -> None:
        job_id, round_ = event.job_id, event.round
        plan_key = self.keys.round_plan(job_id, round_)
        plan = self.store.hash_get_all(plan_key)
        if plan.get("status") in ("committed", "evaluating") or self._current_round(job_id) != round_:
            return
        now = self.clock()
        spec = read_spec(self.store, self.keys, job_id)
        last = round_ >= spec.rounds
        # The last round waits for every client's evaluation: that is what publishes their models.
        status = "evaluating" if last else "committed"
        self.store.hash_set(
            plan_key, {"status": status, "committed_at": repr(now), "deadline_at": repr(now + spec.round_deadline_s)}
        )
        if plan.get("opened_at"):
            ROUND_DURATION.observe(now - float(plan["opened_at"]))
        if spec.personalization.evaluates_after(round_, spec.rounds):
            for client in range(spec.num_clients):
                task = EvaluateTask(job_id=job_id, round=round_, client=client, publish=last)
                self.bus.publish(self.queues.tasks, encode(task))
        if not last:
            self._open_round(job_id, round_ + 1)

    def _on_client_evaluated(self, event: ClientEvaluated) -> None:
        job_id, round_ = event.job_id, event.round
        self.store.hash_set(self.keys.client_metrics(job_id, round_), {str(event.client): json.dumps(event.metrics)})
        plan = self.store.hash_get_all(self.keys.round_plan(job_id, round_))
        if plan.get("status") != "evaluating":
            return
        spec = read_spec(self.store, self.keys, job_id)
        if len(self.store.hash_get_all(self.keys.client_metrics(job_id, round_))) >= spec.num_clients:
            self.store.hash_set(self.keys.round_plan(job_id, round_), {"status": "committed"})
            self._finish(job_id, JobState.SUCCEEDED, "")

    # -- rounds -----------------------------------------------------------------------------

    def _open_round(self, job_id: str, round_: int) -> None:
        spec = read_spec(self.store, self.keys, job_id)
        clients = sample_clients(spec, round_)
        now = self.clock()
        self.store.hash_set(
            self.keys.round_plan(job_id, round_),
            {
                "clients": json.dumps(clients),
                "opened_at": repr(now),
                "deadline_at": repr(now + spec.round_deadline_s),
                "status": "open",
                "wave": "0",
                "expected": str(len(clients)),
            },
        )
        self._set(job_id, round=str(round_))
        self._dispatch(spec, job_id, round_, clients, wave=0)
        log.info("job %s round %d opened: clients %s", job_id, round_, clients)

    def _dispatch(self, spec: JobSpec, job_id: str, round_: int, clients: list[int], wave: int) -> None:
        """One task per client, each carrying its compute budget."""
        upload = self._recent_upload_bytes(job_id)
        for client in clients:
            budget = task_budget(spec, round_, client, upload)
            task = TrainTask(
                job_id=job_id,
                round=round_,
                client=client,
                attempt=0,
                wave=wave,
                local_steps=budget if spec.mode == "backprop" else spec.local_steps,
                perturbations=budget if spec.mode == "fwd" else 0,
            )
            self.bus.publish(self.queues.tasks, encode(task))
        TASKS_DISPATCHED.inc(len(clients))

    def _recent_upload_bytes(self, job_id: str) -> float:
        """Mean bytes per update of the last committed round: what the budgets expect a device to send."""
        records = self.store.list_range(self.keys.metrics(job_id))
        if len(records) < 2:
            return 0.0
        metrics = msgpack.unpackb(records[-1])["metrics"]
        return float(metrics.get("bytes_up", 0.0)) / max(1.0, float(metrics.get("updates", 1.0)))

    def _close_round(self, job_id: str, round_: int, force: bool = False) -> None:
        self.store.hash_set(
            self.keys.round_plan(job_id, round_),
            {"status": "closing", "close_sent_at": repr(self.clock()), "force": "1" if force else ""},
        )
        self.bus.publish(self.queues.aggregate, encode(CloseRound(job_id=job_id, round=round_, force=force)))

    def tick(self) -> None:
        """Deadlines and resends; safe to call at any time, from any scheduler replica after a restart."""
        now = self.clock()
        for job_id in self.store.set_members(self.keys.jobs):
            with self._lock:
                meta = self.store.hash_get_all(self.keys.job(job_id))
                if not meta:
                    continue
                state = JobState(meta["state"])
                if state == JobState.QUEUED and now - float(meta.get("init_sent_at", "0")) > RESEND_AFTER_S:
                    self._set(job_id, init_sent_at=repr(now))
                    self.bus.publish(self.queues.aggregate, encode(InitJob(job_id=job_id)))
                if state != JobState.RUNNING:
                    continue
                round_ = int(meta.get("round", "0"))
                plan = self.store.hash_get_all(self.keys.round_plan(job_id, round_))
                status = plan.get("status")
                if status == "open" and now >= float(plan["deadline_at"]):
                    self._on_deadline(job_id, round_, plan)
                elif status == "evaluating" and now >= float(plan["deadline_at"]):
                    # The global model is committed; clients that never reported keep no published model.
                    done = len(self.store.hash_get_all(self.keys.client_metrics(job_id, round_)))
                    self.store.hash_set(self.keys.round_plan(job_id, round_), {"status": "committed"})
                    self._finish(job_id, JobState.SUCCEEDED, f"{done} client evaluations arrived before the deadline")
                elif status == "closing" and now - float(plan.get("close_sent_at", "0")) > RESEND_AFTER_S:
                    self._close_round(job_id, round_, force=bool(plan.get("force")))

    def _on_deadline(self, job_id: str, round_: int, plan: dict[str, str]) -> None:
        spec = read_spec(self.store, self.keys, job_id)
        merged = len(self.store.set_members(self.keys.round_merged(job_id, round_)))
        expected = int(plan["expected"])
        if merged >= spec.quorum_count_of(expected):
            log.warning("job %s round %d: deadline with %d of %d updates; closing", job_id, round_, merged, expected)
            LATE_TASKS.inc()
            self._close_round(job_id, round_, force=True)
        else:
            self._finish(
                job_id,
                JobState.FAILED,
                f"round {round_} reached its deadline ({spec.round_deadline_s:g}s) with {merged} of {expected} "
                f"updates; the quorum is {spec.quorum_count_of(expected)}",
            )

    # -- state helpers ----------------------------------------------------------------------

    def _current_round(self, job_id: str) -> int:
        return int(self.store.hash_get(self.keys.job(job_id), "round") or "0")

    def _set(self, job_id: str, **fields: str) -> None:
        self.store.hash_set(self.keys.job(job_id), {**fields, "updated_at": repr(self.clock())})

    def _finish(self, job_id: str, state: JobState, error: str) -> None:
        previous = read_state(self.store, self.keys, job_id)
        self._set(job_id, state=state, error=error)
        if previous == JobState.RUNNING:
            JOBS_RUNNING.dec()
        JOBS_FINISHED.labels(state=str(state)).inc()
        if state != JobState.SUCCEEDED:
            self.bus.publish(self.queues.aggregate, encode(DropJob(job_id=job_id)))
        log.info("job %s %s%s", job_id, state, f": {error}" if error else "")
