"""Job lifecycle and the round loop. Never touches tensors.

A job moves queued -> running -> succeeded | failed | cancelled. Each round: sample
clients (seeded), publish one task per client (or per batch of `clients_per_task`), wait for the aggregator's "merged"
events, then ask it to close the round when every update is in, or at the deadline
when the quorum is. All state lives in the store, with absolute deadlines, so a
restarted scheduler picks up where the last one stopped; messages it may have sent
twice are harmless because every step it asks for is idempotent.

The store must keep its state across restarts (Redis with persistence). If it loses it anyway
(Redis restarted without persistence, or flushed), the scheduler notices: it writes a random
instance marker into the store once and checks it every tick. When the marker is gone, every job
this scheduler knew unfinished is recorded as failed, from the copy of its record it keeps in
memory, rather than vanishing or restarting from scratch; /readyz reports `state: false` until
that is done. A scheduler that was down while the store lost its state has no such copy: those
jobs are gone without a record.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from services.scaler.status import read_pool_status
from services.scheduler.budgets import sample_clients, task_budget
from shared.bus import Bus, Queues
from shared.data import check_local_data
from shared.identity import ClientRegistry, IdentityError, SignedKind, TaskSigner
from shared.messages import (
    ClientEvaluated,
    ClientFailed,
    CloseRound,
    DropJob,
    EvaluateTask,
    InitJob,
    InvalidMessage,
    JobFailed,
    JobInitialized,
    MoreWork,
    RoundCommitted,
    TrainTask,
    UpdateInvalid,
    UpdateMerged,
    decode_scheduler,
)
from shared.metrics import (
    CLIENT_FAILURES_REJECTED,
    CLIENT_MEAN_FIGURE,
    EVALUATIONS_REJECTED,
    FWD_EXTRA_WAVES,
    JOBS_FINISHED,
    JOBS_RUNNING,
    JOBS_SUBMITTED,
    LATE_TASKS,
    ROUND_DURATION,
    STORE_STATE_LOST,
    TASKS_DISPATCHED,
    forget_job,
)
from shared.modes import mode_of
from shared.privacy import privacy_view
from shared.signing import BusAuth
from shared.spec import JobSpec
from shared.state import JobEvent, JobMeta, JobNotFound, JobState, Repositories, RoundPlan, RoundRecord, RoundStatus
from shared.state.records import EventKind
from shared.store import Store

log = logging.getLogger(__name__)

RESEND_AFTER_S = 60.0
"""A control message with no answer after this long is sent again (they are idempotent)."""

STATE_LOST_ERROR = (
    "the store lost its state while the job was {state} at round {round} (its instance marker vanished: Redis "
    "restarted without persistence, or was flushed); the job's rounds, updates and models are gone, so it cannot "
    "go on. Run Redis with persistence (appendonly yes, as the chart does) and submit the job again"
)

__all__ = [
    "RESEND_AFTER_S",
    "STATE_LOST_ERROR",
    "JobConflict",
    "Scheduler",
    "new_job_id",
    "pack_tasks",
    "sample_clients",
]


class JobConflict(RuntimeError):
    """The request does not fit the job's state (e.g. cancelling a finished job)."""


def new_job_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "job"
    return f"{slug}-{uuid.uuid4().hex[:10]}"


CLIENT_MEAN_FIGURES = (
    "global_accuracy",
    "personalized_accuracy",
    "reference_weighted_reward",
    "global_weighted_reward",
    "personalized_weighted_reward",
    "global_kl",
    "personalized_kl",
)
"""Per-client figures the round view also averages over clients (when every client reported them)."""


def _export_client_means(job_id: str, per_client: dict[int, dict[str, Any]]) -> None:
    """Prometheus: each per-client figure averaged over the clients that reported it this round."""
    sums: dict[tuple[str, str], list[float]] = {}
    for figures in per_client.values():
        for key, value in figures.items():
            model, _, figure = key.partition("_")
            if model in ("global", "personalized", "reference") and isinstance(value, (int, float)) and figure:
                sums.setdefault((model, figure), []).append(float(value))
    for (model, figure), values in sums.items():
        CLIENT_MEAN_FIGURE.labels(job_id=job_id, model=model, figure=figure).set(float(np.mean(values)))


def pack_tasks(budgets: list[tuple[int, dict[str, int]]], size: int) -> list[tuple[list[int], dict[str, int]]]:
    """Clients (in the order given) packed into tasks of at most `size`, each of clients with the same budget.

    A batch carries one budget for all its clients, so a client whose budget differs from the one before it
    (deadline budgets differ by device) starts a new batch; with fixed budgets every batch but the last is full.
    """
    tasks: list[tuple[list[int], dict[str, int]]] = []
    for client, budget in budgets:
        if tasks and len(tasks[-1][0]) < size and tasks[-1][1] == budget:
            tasks[-1][0].append(client)
        else:
            tasks.append(([client], budget))
    return tasks


class Scheduler:
    def __init__(
        self,
        bus: Bus,
        store: Store,
        namespace: str = "pwff",
        clock: Callable[[], float] = time.time,
        tick_s: float = 0.5,
        retention_s: int = 0,
        job_pools: bool = False,
        identities: ClientRegistry | None = None,
        presence_ttl_s: float = 2.0,
        task_signer: TaskSigner | None = None,
        auth: BusAuth | None = None,
    ) -> None:
        self.bus = bus
        self.auth = auth if auth is not None else BusAuth.unsealed()
        """Seals what it publishes and checks what it consumes (shared.signing)."""
        self.store = store
        self.state = Repositories(store, namespace)
        self.jobs = self.state.jobs
        self.queues = Queues(namespace)
        self.clock = clock
        self.tick_s = tick_s
        self.retention_s = retention_s
        """Seconds a job's keys live after it ends (PWFF_JOB_RETENTION_S; 0: forever)."""
        self._lock = threading.RLock()
        self.job_pools = job_pools
        """A job with `resources` goes to its own task queue, served by its pool (services.scaler)."""
        self.identities = identities
        """Enrolled bound clients' keys (PWFF_CLIENTS_FILE): a bound client's evaluation must be signed by it."""
        self.task_signer = task_signer
        """The scheduler's key (PWFF_SCHEDULER_KEY): it signs the tasks of bound clients."""
        self.presence_ttl_s = presence_ttl_s
        """How long a bound client's presence (a consumer on its queue) is reused by job views."""
        self._presence: dict[str, tuple[float, bool]] = {}
        self._presence_lock = threading.Lock()
        self._instance: str | None = None
        """The store's instance marker as this scheduler last checked it (None: not yet, or being handled)."""
        self._unfinished: dict[str, JobMeta] = {}
        """The last record seen of every job not yet final: what is left to say it failed if the store loses it."""

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume aggregator events, and check deadlines every `tick_s`, until `stop`."""
        JOBS_RUNNING.set(sum(1 for job in self.list_jobs() if job["state"] == JobState.RUNNING))
        try:
            self.check_store_instance()  # before the first probe asks (the tick checks it from then on)
        except Exception:
            log.exception("reading the store's instance marker failed; the tick tries again")
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

    def submit(self, spec: JobSpec, tenant: str = "") -> str:
        """Create a job owned by `tenant` (the API's caller) and ask the aggregator to initialize it.

        Raises ValueError (DataMismatch) for a local data source that does not fit the spec."""
        spec = check_local_data(spec)  # reads a local source once: its fields, labels and partition
        job_id = new_job_id(spec.name)
        now = self.clock()
        with self._lock:
            meta = JobMeta(id=job_id, spec=spec, tenant=tenant, created_at=now, updated_at=now, init_sent_at=now)
            self.jobs.create(meta)
            self._unfinished[job_id] = meta
            self._event(job_id, "state", "submitted", state=JobState.QUEUED)
        JOBS_SUBMITTED.inc()
        self.bus.publish(self.queues.aggregate, self.auth.seal(InitJob(job_id=job_id)))
        log.info("job %s submitted (%s on %s, %d rounds)", job_id, spec.model, spec.dataset, spec.rounds)
        return job_id

    def cancel(self, job_id: str) -> None:
        with self._lock:
            state = self.jobs.state(job_id)
            if state is None:
                raise JobNotFound(job_id)
            if state.final:
                raise JobConflict(f"job {job_id} already {state}")
            self._finish(job_id, JobState.CANCELLED, "")

    def purge(self, job_id: str) -> dict[str, Any]:
        """Cancel the job if it has not ended, then remove every key it has in the store (its state, rounds,
        updates, global states, published models, clients' personal parts and residuals, adaptations).

        Raises JobNotFound when nothing of the job is left. A task a worker is running for it at this
        moment may still write its update; nothing reads it, and the next tick removes it (see `tick`).
        """
        with self._lock:
            state = self.jobs.state(job_id)
            cancelled = state is not None and not state.final
            if cancelled:
                self._finish(job_id, JobState.CANCELLED, "purged")
            removed = self.jobs.purge(job_id)
        if state is None and removed == 0:
            raise JobNotFound(job_id)
        forget_job(job_id, linger_s=0)  # nothing left to scrape a last time
        log.info("job %s purged: %d keys removed%s", job_id, removed, " (cancelled first)" if cancelled else "")
        return {"id": job_id, "purged": True, "cancelled": cancelled, "previous_state": state, "keys_removed": removed}

    def get_job(self, job_id: str) -> dict[str, Any]:
        """The job view (`services.scheduler.views.JobView`) as plain data."""
        meta = self.jobs.require(job_id)
        history = self.state.rounds.history(job_id)
        return {
            **self._summary(meta),
            "rounds": meta.spec.rounds,
            "updated_at": meta.updated_at,
            "error": meta.error or None,
            "spec": meta.spec.model_dump(mode="json"),
            "metrics": [self._round_view(job_id, record) for record in history],
            "pool": read_pool_status(self.store, self.state.keys, job_id),  # its own workers (services.scaler)
            "clients": self.client_presence(meta.spec),
            "privacy": privacy_view(meta.spec, history),
        }

    def events(self, job_id: str) -> list[JobEvent]:
        """The job's events, oldest first: state changes, round commits and deadlines, client failures."""
        self.jobs.require(job_id)
        return self.jobs.events(job_id)

    def _round_view(self, job_id: str, record: RoundRecord) -> dict[str, Any]:
        entry: dict[str, Any] = {"round": record.round, "clients": record.clients, **record.metrics}
        plan = self.jobs.plan(job_id, record.round)
        if plan is not None and plan.committed_at is not None:
            entry["duration_s"] = plan.committed_at - plan.opened_at
        entry.update(record.extra)
        per_client = self.jobs.client_figures(job_id, record.round)
        if per_client:
            entry["per_client"] = per_client
            for figure in CLIENT_MEAN_FIGURES:
                values = [m[figure] for m in per_client.values() if isinstance(m.get(figure), (int, float))]
                if len(values) == len(per_client):
                    entry[f"client_mean_{figure}"] = float(np.mean(values))
        return entry

    @staticmethod
    def _summary(meta: JobMeta) -> dict[str, Any]:
        return {
            "id": meta.id,
            "name": meta.spec.name,
            "tenant": meta.tenant,
            "state": str(meta.state),
            "round": meta.round,
            "created_at": meta.created_at,
        }

    def list_jobs(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Every job's summary (`services.scheduler.views.JobSummary`), or `tenant`'s only, newest first."""
        metas = [
            meta
            for meta in map(self.jobs.get, self.jobs.ids())
            if meta is not None and (tenant is None or meta.tenant == tenant)
        ]
        return [self._summary(meta) for meta in sorted(metas, key=lambda meta: meta.created_at, reverse=True)]

    def model_archive(self, job_id: str, client: int | None = None) -> bytes | None:
        """The published PEFT folder (tar.gz) of the global model or of one client's model."""
        spec = self.jobs.spec(job_id)
        if client is None:
            return self.state.tensors.archive(job_id, "global")
        if not 0 <= client < spec.num_clients:
            raise ValueError(f"client {client} out of range: the job has {spec.num_clients} clients")
        return self.state.tensors.archive(job_id, f"client-{client}")

    # -- events from the aggregator ---------------------------------------------------------

    def handle_event(self, body: bytes) -> None:
        event = decode_scheduler(body, auth=self.auth)
        with self._lock:
            state = self.jobs.state(event.job_id)
            if state is None:
                log.warning("event %s for unknown job %s ignored", event.type, event.job_id)
                return
            if isinstance(event, JobFailed):
                if not state.final:
                    self._finish(event.job_id, JobState.FAILED, event.error)
                return
            if state.final:
                return  # e.g. a round that committed after the job was cancelled
            if isinstance(event, ClientFailed):
                identity = self.jobs.spec(event.job_id).clients.identity(event.client)
                if identity is not None:  # one client must not put words in another's event log
                    self._authenticate(event, identity)
                self._event(
                    event.job_id,
                    "client-failed",
                    f"client {event.client} failed in round {event.round}: {event.reason}",
                    round=event.round,
                    client=event.client,
                )
                return
            if isinstance(event, JobInitialized):
                if state == JobState.QUEUED:
                    self._set(event.job_id, state=JobState.RUNNING)
                    self._event(event.job_id, "state", "running: the initial state is ready", state=JobState.RUNNING)
                    JOBS_RUNNING.inc()
                    self._open_round(event.job_id, 1)
            elif isinstance(event, UpdateMerged | UpdateInvalid):
                self._on_merged(event)
            elif isinstance(event, MoreWork):
                self._on_more_work(event)
            elif isinstance(event, ClientEvaluated):
                self._on_client_evaluated(event)
            elif isinstance(event, RoundCommitted):
                self._on_committed(event)

    def _on_merged(self, event: UpdateMerged | UpdateInvalid) -> None:
        """Close the round once every update is in: merged, or rejected (it will never come)."""
        plan = self.jobs.plan(event.job_id, event.round)
        arrived = event.merged_count + event.rejected_count
        if plan is not None and plan.status == RoundStatus.OPEN and arrived >= plan.expected:
            self._close_round(event.job_id, event.round)

    def _on_more_work(self, event: MoreWork) -> None:
        """Another wave of work for the same step (fwd variance control)."""
        job_id, round_ = event.job_id, event.round
        plan = self.jobs.plan(job_id, round_)
        if plan is None or plan.status != RoundStatus.CLOSING or plan.wave >= event.wave:
            return  # a repeated event, or the round moved on
        spec = self.jobs.spec(job_id)
        clients = plan.clients
        count = mode_of(spec).wave_tasks(spec, len(clients), event.perturbations)
        if count <= 0:
            self._close_round(job_id, round_, force=True)
            return
        # Rotate through the round's clients so a partial wave does not always land on the same ones.
        start = (event.wave * count) % len(clients)
        chosen = [clients[(start + i) % len(clients)] for i in range(count)]
        # The wave expects what is merged so far plus its own tasks: an update an earlier wave closed
        # without (at its deadline) is not waited for again.
        merged = len(self.state.rounds.merged(job_id, round_))
        self.jobs.update_plan(
            job_id,
            round_,
            status=RoundStatus.OPEN,
            wave=event.wave,
            expected=merged + count,
            deadline_at=self.clock() + spec.round_deadline_s,
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
        plan = self.jobs.plan(job_id, round_)
        done = (RoundStatus.COMMITTED, RoundStatus.EVALUATING)
        if plan is None or plan.status in done or self.jobs.current_round(job_id) != round_:
            return
        now = self.clock()
        spec = self.jobs.spec(job_id)
        accuracy = event.metrics.get("accuracy")
        figure = f", accuracy {accuracy:.4f}" if accuracy is not None and accuracy == accuracy else ""
        self._event(job_id, "round", f"round {round_} committed with clients {event.clients}{figure}", round=round_)
        last = round_ >= spec.rounds
        # The last round waits for every client's evaluation: that is what publishes their models.
        status = RoundStatus.EVALUATING if last else RoundStatus.COMMITTED
        self.jobs.update_plan(job_id, round_, status=status, committed_at=now, deadline_at=now + spec.round_deadline_s)
        ROUND_DURATION.observe(now - plan.opened_at)
        if spec.personalization.evaluates_after(round_, spec.rounds):
            for client in range(spec.num_clients):
                task = EvaluateTask(job_id=job_id, round=round_, client=client, publish=last)
                self._send(spec, job_id, client, task)
        if not last:
            self._open_round(job_id, round_ + 1)

    def _on_client_evaluated(self, event: ClientEvaluated) -> None:
        job_id, round_ = event.job_id, event.round
        identity = self.jobs.spec(job_id).clients.identity(event.client)
        if identity is not None:
            self._authenticate(event, identity)
        figures: dict[str, Any] = dict(event.metrics)
        if event.samples:
            figures["samples"] = event.samples
        reported = self.jobs.add_client_figures(job_id, round_, event.client, figures)
        _export_client_means(job_id, self.jobs.client_figures(job_id, round_))
        plan = self.jobs.plan(job_id, round_)
        if plan is None or plan.status != RoundStatus.EVALUATING:
            return
        if reported >= self.jobs.spec(job_id).num_clients:
            self.jobs.update_plan(job_id, round_, status=RoundStatus.COMMITTED)
            self._finish(job_id, JobState.SUCCEEDED, "")

    def _authenticate(self, event: ClientEvaluated | ClientFailed, identity: str) -> None:
        """A bound client's figures and failures count only signed by its enrolled, unrevoked key (else
        dead-lettered and counted)."""
        kind: SignedKind = "evaluation" if isinstance(event, ClientEvaluated) else "failure"
        try:
            if self.identities is None:
                raise IdentityError(
                    "no clients file is configured (PWFF_CLIENTS_FILE): bound clients cannot be verified"
                )
            fields = event.model_dump(mode="json", exclude={"signature"})
            self.identities.verify(identity, fields, event.signature, kind)
        except IdentityError as error:
            (EVALUATIONS_REJECTED if kind == "evaluation" else CLIENT_FAILURES_REJECTED).inc()
            log.warning("rejected %s of %s round %d: %s", kind, event.job_id, event.round, error)
            raise InvalidMessage(f"{kind} of {event.job_id} round {event.round}: {error}") from None

    # -- rounds -----------------------------------------------------------------------------

    def _open_round(self, job_id: str, round_: int) -> None:
        spec = self.jobs.spec(job_id)
        clients = sample_clients(spec, round_)
        now = self.clock()
        plan = RoundPlan(
            clients=clients,
            opened_at=now,
            deadline_at=now + spec.round_deadline_s,
            expected=len(clients),
            dispatched=False,
        )
        self.jobs.save_plan(job_id, round_, plan)
        self._set(job_id, round=round_)
        self._dispatch(spec, job_id, round_, clients, wave=0)
        self.jobs.update_plan(job_id, round_, dispatched=True)
        log.info("job %s round %d opened: clients %s", job_id, round_, clients)

    def _dispatch(self, spec: JobSpec, job_id: str, round_: int, clients: list[int], wave: int) -> None:
        """One task per client, each carrying its compute budget; with `clients_per_task` > 1, batches of
        up to that many clients that share a budget."""
        mode = mode_of(spec)
        upload = self._recent_upload_bytes(job_id)
        budgets = [(client, mode.task_fields(spec, task_budget(spec, round_, client, upload))) for client in clients]
        for batch, budget in pack_tasks(budgets, spec.clients_per_task):
            task = TrainTask(
                job_id=job_id,
                round=round_,
                client=batch[0],
                clients=batch if len(batch) > 1 else [],
                attempt=0,
                wave=wave,
                **budget,
            )
            self._send(spec, job_id, batch[0], task)
        TASKS_DISPATCHED.inc(len(clients))

    def _send(self, spec: JobSpec, job_id: str, client: int, task: TrainTask | EvaluateTask) -> None:
        """Publish a task on its client's queue; a bound client's signed with the scheduler's key, which
        its worker checks before it runs anything (others may write to that queue too)."""
        if spec.clients.identity(client) is not None:
            if self.task_signer is None:
                log.warning(
                    "no scheduler key (PWFF_SCHEDULER_KEY): bound client %d of %s will refuse its task", client, job_id
                )
            else:
                fields = task.model_dump(mode="json", exclude={"signature"})
                task = task.model_copy(update={"signature": self.task_signer.sign(fields)})
        self.bus.publish(self._tasks_queue(spec, job_id, client), self.auth.seal(task))

    def _tasks_queue(self, spec: JobSpec, job_id: str, client: int) -> str:
        identity = spec.clients.identity(client)
        if identity is not None:
            return self.queues.client_tasks(identity)  # only the worker started for that client gets it
        return self.queues.job_tasks(job_id) if self.job_pools and spec.resources is not None else self.queues.tasks

    def client_presence(self, spec: JobSpec) -> list[dict[str, Any]] | None:
        """Bound clients: whether a worker is consuming each one's task queue now (absent: a straggler)."""
        if spec.clients.ids is None:
            return None
        now = time.monotonic()
        # Job views are polled (by every `pwff status`, every dashboard): the clients whose presence is older
        # than presence_ttl_s are asked together, in one exchange with the broker, and the answer is reused
        # by every view until then. The lock makes concurrent views wait for one query, not each send theirs.
        with self._presence_lock:
            stale = {
                self.queues.client_tasks(identity): identity
                for identity in spec.clients.ids
                if (known := self._presence.get(identity)) is None or now - known[0] > self.presence_ttl_s
            }
            if stale:
                try:
                    counts = self.bus.consumer_counts(list(stale))
                except Exception:  # the job view must answer even when the broker does not
                    log.warning("could not count the consumers of clients %s", ", ".join(stale.values()), exc_info=True)
                    counts = None
                if len(self._presence) > 10_000:
                    self._presence.clear()  # only bounds memory: entries are re-asked when needed
                for queue, identity in stale.items():
                    if counts is None:
                        self._presence.pop(identity, None)  # unknown: absent now, asked again next time
                    else:
                        self._presence[identity] = (now, counts.get(queue, 0) > 0)
            present = {identity: known[1] for identity, known in self._presence.items()}
        return [
            {"client": index, "id": identity, "present": present.get(identity, False)}
            for index, identity in enumerate(spec.clients.ids)
        ]

    def _recent_upload_bytes(self, job_id: str) -> float:
        """Mean bytes per update of the last committed round: what the budgets expect a device to send."""
        history = self.state.rounds.history(job_id)
        if len(history) < 2:
            return 0.0
        metrics = history[-1].metrics
        return float(metrics.get("bytes_up", 0.0)) / max(1.0, float(metrics.get("updates", 1.0)))

    def _close_round(self, job_id: str, round_: int, force: bool = False) -> None:
        self.jobs.update_plan(job_id, round_, status=RoundStatus.CLOSING, close_sent_at=self.clock(), force=force)
        self.bus.publish(self.queues.aggregate, self.auth.seal(CloseRound(job_id=job_id, round=round_, force=force)))

    def tick(self) -> None:
        """Deadlines and resends; safe to call at any time, from any scheduler replica after a restart."""
        self.check_store_instance()
        now = self.clock()
        for job_id in self.jobs.ids():
            with self._lock:
                meta = self.jobs.get(job_id)
                if meta is None:
                    # Its record expired (retention) or it was purged: drop what a task may have written after
                    # the job ended (a key written then has no TTL) and its entry in the set of jobs.
                    self.jobs.purge(job_id)
                    self._unfinished.pop(job_id, None)
                    continue
                if meta.state.final:
                    self._unfinished.pop(job_id, None)
                else:
                    self._unfinished[job_id] = meta
                if meta.state == JobState.QUEUED and now - meta.init_sent_at > RESEND_AFTER_S:
                    self._set(job_id, init_sent_at=now)
                    self.bus.publish(self.queues.aggregate, self.auth.seal(InitJob(job_id=job_id)))
                if meta.state != JobState.RUNNING:
                    continue
                plan = self.jobs.plan(job_id, meta.round)
                if plan is not None:
                    self._check_round(meta, plan, now)
                elif meta.round == 0:
                    # Killed between marking the job running and opening round 1 (JobInitialized is not resent
                    # for a running job): open it now.
                    log.warning("job %s running with no round open; opening round 1", job_id)
                    self._open_round(job_id, 1)

    def _check_round(self, meta: JobMeta, plan: RoundPlan, now: float) -> None:
        job_id, round_ = meta.id, meta.round
        if plan.status == RoundStatus.COMMITTED and round_ < meta.spec.rounds:
            # A scheduler killed between marking the round committed and opening the next one: the aggregator's
            # event was consumed (or its redelivery finds the round done), so nothing else would open it.
            log.warning("job %s round %d committed but round %d never opened; opening it", job_id, round_, round_ + 1)
            self._open_round(job_id, round_ + 1)
        elif plan.status == RoundStatus.OPEN and not plan.dispatched:
            # Its dispatch was cut short (the broker stayed away past the publish retries, or the scheduler died):
            # publish the round's tasks again. A task that did go out twice trains twice; the aggregator merges
            # one update per client and counts the other as a duplicate.
            log.warning("job %s round %d: its tasks were not all published; publishing them again", job_id, round_)
            self._dispatch(meta.spec, job_id, round_, plan.clients, wave=0)
            self.jobs.update_plan(job_id, round_, dispatched=True)
        elif plan.status == RoundStatus.OPEN and now >= plan.deadline_at:
            self._on_deadline(meta, plan)
        elif plan.status == RoundStatus.EVALUATING and now >= plan.deadline_at:
            # The global model is committed; clients that never reported keep no published model.
            done = len(self.jobs.client_figures(job_id, round_))
            self.jobs.update_plan(job_id, round_, status=RoundStatus.COMMITTED)
            self._finish(job_id, JobState.SUCCEEDED, f"{done} client evaluations arrived before the deadline")
        elif plan.status == RoundStatus.CLOSING and now - plan.close_sent_at > RESEND_AFTER_S:
            self._close_round(job_id, round_, force=plan.force)

    def _on_deadline(self, meta: JobMeta, plan: RoundPlan) -> None:
        job_id, round_, spec = meta.id, meta.round, meta.spec
        merged = len(self.state.rounds.merged(job_id, round_))
        quorum = spec.quorum_count_of(plan.expected)
        if merged >= quorum:
            log.warning(
                "job %s round %d: deadline with %d of %d updates; closing", job_id, round_, merged, plan.expected
            )
            LATE_TASKS.inc()
            absent = sorted({*plan.clients} - {client for client, _ in self.state.rounds.merged(job_id, round_)})
            self._event(
                job_id,
                "deadline",
                f"round {round_} closed at its deadline with {merged} of {plan.expected} updates; "
                f"absent: clients {absent}",
                round=round_,
            )
            self._close_round(job_id, round_, force=True)
        else:
            self._finish(
                job_id,
                JobState.FAILED,
                f"round {round_} reached its deadline ({spec.round_deadline_s:g}s) with {merged} of {plan.expected} "
                f"updates; the quorum is {quorum}",
            )

    # -- the store's state ------------------------------------------------------------------

    @property
    def store_state_known(self) -> bool:
        """The store holds the state this scheduler saw (its instance marker is the one last checked)."""
        return self._instance is not None

    def check_store_instance(self) -> None:
        """Compare the store's instance marker with the one seen before; on a loss, fail the jobs it knew.

        The first check adopts the marker, or writes one (put-if-absent, so replicas agree). A later check
        that finds none, or another replica's newer one, means the store lost its state since.
        """
        key = self.state.keys.instance
        with self._lock:
            raw = self.store.get(key)
            marker = raw.decode() if raw is not None else None
            if marker is not None and marker == self._instance:
                return
            if self._instance is not None:
                self._instance = None  # /readyz says so until the jobs are recorded failed
                self._on_state_lost()
            if marker is None:  # written last: a scheduler killed above leaves it absent, and the next one sees it
                self.store.put_if_absent(key, uuid.uuid4().hex.encode())
                raw = self.store.get(key)
                marker = raw.decode() if raw is not None else None
            self._instance = marker

    def _on_state_lost(self) -> None:
        lost = sorted(self._unfinished.values(), key=lambda meta: meta.created_at)
        STORE_STATE_LOST.inc()
        log.error(
            "the store lost its state (instance marker gone); failing the %d unfinished jobs it held: %s",
            len(lost),
            ", ".join(meta.id for meta in lost) or "none",
        )
        now = self.clock()
        for meta in lost:
            if self.jobs.get(meta.id) is not None:
                continue  # recorded again already, by another scheduler replica that noticed first
            error = STATE_LOST_ERROR.format(state=meta.state, round=meta.round)
            # One write with the final state: a record that says "running" with no rounds behind it would never end.
            self.jobs.create(meta.model_copy(update={"state": JobState.FAILED, "error": error, "updated_at": now}))
            self._ended(meta.id, meta.state, JobState.FAILED, error)

    # -- state helpers ----------------------------------------------------------------------

    def _set(self, job_id: str, **fields: Any) -> None:
        self.jobs.update(job_id, **fields, updated_at=self.clock())

    def _event(self, job_id: str, kind: EventKind, message: str, **fields: Any) -> None:
        self.jobs.add_event(job_id, JobEvent(at=self.clock(), kind=kind, message=message[:4000], **fields))

    def _finish(self, job_id: str, state: JobState, error: str) -> None:
        previous = self.jobs.state(job_id)
        self._set(job_id, state=state, error=error)
        self._ended(job_id, previous, state, error)

    def _ended(self, job_id: str, previous: JobState | None, state: JobState, error: str) -> None:
        """What follows a job's final state: its event, metrics, retention, the aggregator told to drop it, a log
        line."""
        self._unfinished.pop(job_id, None)
        self._event(job_id, "state", f"{state}: {error}" if error else str(state), state=state)
        if previous == JobState.RUNNING:
            JOBS_RUNNING.dec()
        JOBS_FINISHED.labels(state=str(state)).inc()
        forget_job(job_id)
        if self.retention_s > 0:
            # Redis expires the job's keys on its own, whether or not a scheduler is still running then.
            self.jobs.expire(job_id, self.retention_s)
        if state != JobState.SUCCEEDED:
            self.bus.publish(self.queues.aggregate, self.auth.seal(DropJob(job_id=job_id)))
        log.info("job %s %s%s", job_id, state, f": {error}" if error else "")
