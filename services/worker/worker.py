"""One task at a time: fetch the global state, train this client, store the update, announce it.

A batched task (`TrainTask.clients`, `JobSpec.clients_per_task`) is its clients' tasks run one after
another under one message: the global state is fetched and decoded once (the cache below), and each
client stores and announces its own update exactly as its own task would.

The worker keeps nothing between tasks that Redis cannot rebuild: the loaded base model
is a cache, and the trainable state is overwritten at every task. The global state is
cached too, keyed by (job, round): a worker downloads a job's state once and then only
each round's committed delta (`TensorRepository.download_delta`), checked against a
fingerprint of the state it applies to; anything missing or mismatched falls back to
the whole state. The bus acks a task only after `handle` returns, i.e. after the update
is stored and announced; a worker killed mid-task leaves the task to be redelivered to
another. How a client trains is its job's training mode (`shared.modes`); this class only
moves state in and out, including a client's error-feedback residual (client-side codec
state, stored apart from its personal tensors). A bound client's personal tensors and residual
are kept in its state directory on its own machine (`shared.client_state`), not in Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import Counter
from pydantic import ValidationError

from shared import data, local_data
from shared.adapters import ModelCache
from shared.bus import Bus, Queues
from shared.client_state import ClientStateDir
from shared.codec import (
    RESIDUAL_PREFIX,
    CodecError,
    apply_delta,
    decode_tensors,
    decode_update,
    encode_tensors,
    split_residual,
    state_digest,
)
from shared.identity import IdentityError, TaskVerifier, UpdateSigner, payload_digest
from shared.messages import (
    ClientEvaluated,
    ClientFailed,
    EvaluateTask,
    InvalidMessage,
    TrainTask,
    UpdateReady,
    decode_aggregator,
    decode_task,
)
from shared.metrics import DOWNLOAD_BYTES, MESSAGES_REJECTED, TASK_DURATION, TASKS_PROCESSED, UPLOAD_BYTES
from shared.models import load_trainable_state, peft_folder_archive
from shared.modes import mode_of
from shared.modes.base import EvaluationContext, LocalContext, LocalResult, State, TaskFailed
from shared.signing import BusAuth
from shared.spec import JobSpec, format_validation_error
from shared.state import JobNotFound, JobState, Repositories
from shared.state.tensors import PersonalVersion, TensorRepository
from shared.store import Store

log = logging.getLogger(__name__)

# Defined here, not in shared.metrics, because only workers move client-side codec state (error-feedback
# residuals): on a real device it would never leave the client, so it is not counted as a download.
CLIENT_STATE_BYTES = Counter(
    "pwff_client_state_bytes_total",
    "Bytes of client-side codec state (error-feedback residuals) a worker read or wrote in the store",
    ["direction"],
)

_CACHED_JOBS = 4


@dataclass
class _Cached:
    """A job's global state as committed at `round` (never modified in place: tasks read it)."""

    round: int
    state: State
    digest: str | None = None

    def fingerprint(self) -> str:
        if self.digest is None:
            self.digest = state_digest(self.state)
        return self.digest


@dataclass(frozen=True)
class BoundClient:
    """A client this worker was started for: its own data file and its signing key."""

    data: Path
    signer: UpdateSigner


class Worker:
    def __init__(
        self,
        bus: Bus,
        store: Store,
        cache_dir: Path,
        namespace: str = "pwff",
        update_ttl_s: int = 7 * 24 * 3600,
        max_message_bytes: int = 64 * 1024,
        name: str = "worker",
        tasks_queue: str = "",
        clients: Mapping[str, BoundClient] | None = None,
        state_dir: Path | None = None,
        scheduler_key: TaskVerifier | None = None,
        auth: BusAuth | None = None,
    ) -> None:
        self.bus = bus
        self.auth = auth if auth is not None else BusAuth.unsealed()
        """Seals what it publishes and checks what it consumes (shared.signing)."""
        self.state = Repositories(store, namespace, update_ttl_s)
        self.queues = Queues(namespace)
        self.clients = dict(clients or {})
        """Bound clients this worker serves (`--client`): it consumes only their queues and reads only their files."""
        self.scheduler_key = scheduler_key
        """The scheduler's public key: a bound worker runs only tasks it signed (None: it runs none)."""
        self.task_queues = [self.queues.client_tasks(identity) for identity in self.clients] or [
            tasks_queue or self.queues.tasks
        ]
        # A bound client's personal tensors and codec residual never leave its machine: they live in its
        # state directory (shared.client_state), read back when the worker restarts; a pool worker keeps
        # them in the store, where any worker picks its clients up.
        self.client_tensors: TensorRepository | ClientStateDir = (
            ClientStateDir(state_dir or cache_dir / "client-state") if self.clients else self.state.tensors
        )
        self.tasks_queue = self.task_queues[0]
        """The shared task queue, a per-job pool's (PWFF_TASKS_QUEUE, set by services.scaler), or the first
        bound client's."""
        # One task at a time even when several clients' queues are consumed: tasks share the loaded model.
        self._task_lock = threading.Lock()
        self.cache_dir = cache_dir
        self.max_message_bytes = max_message_bytes
        self.name = name
        self.models = ModelCache(cache_dir)
        self._specs: dict[str, JobSpec] = {}
        self._states: OrderedDict[str, _Cached] = OrderedDict()

    def run(self, stop: threading.Event) -> None:
        log.info("%s consuming %s", self.name, ", ".join(self.task_queues))
        if len(self.task_queues) == 1:
            self.bus.consume(self.tasks_queue, self.handle, stop)
            return
        loops = [
            threading.Thread(target=self.bus.consume, args=(queue, self.handle, stop), name=f"consume-{queue}")
            for queue in self.task_queues
        ]
        for loop in loops:
            loop.start()
        for loop in loops:
            loop.join()

    # -- one task ---------------------------------------------------------------------------

    def handle(self, body: bytes) -> None:
        task = decode_task(body, self.max_message_bytes, self.auth)
        if self.clients:
            self._authenticate(task)
        if isinstance(task, TrainTask) and task.clients:
            self._handle_batch(task)
        else:
            self._handle_one(task)

    def _handle_batch(self, batch: TrainTask) -> None:
        """Train a batch's clients one after another, each exactly as its own task would be.

        Each client gets its own update and announcement, so the aggregator sees what N tasks would
        send. A client that fails for a reason of its own is reported (ClientFailed) and the batch goes
        on; a batch that is wrong as a whole (unknown job, a client out of range, a bound client, a
        budget over the job's) is dead-lettered before any client trains. A transient error (the store
        away) fails the batch, and the bus redelivers it: a client whose update was stored before then
        is found by its announcement and announced again, never trained twice.
        """
        job_id = batch.job_id
        try:
            spec = self._spec(job_id)
        except JobNotFound:
            raise InvalidMessage(f"task for unknown job {job_id}") from None
        except ValidationError as error:
            reason = f"the job's spec does not load here: {format_validation_error(error)}"
            for client in batch.batch:
                self._report_failure(batch.for_client(client), TaskFailed(reason), identity=None)
            raise InvalidMessage(f"batch failed: {reason}") from None
        beyond = [client for client in batch.batch if client >= spec.num_clients]
        if beyond:
            raise InvalidMessage(f"clients {beyond} out of range for job {job_id}")
        if self.clients or spec.clients.kind == "bound":
            # Bound clients' tasks go to their own queues, one signed task each (the spec refuses batches).
            raise InvalidMessage(f"a batch of {job_id} reached a bound worker or names bound clients")
        _check_budget(batch, spec)
        log.info(
            "%s starting a batch of %d clients of %s round %d wave %d",
            self.name,
            len(batch.batch),
            job_id,
            batch.round,
            batch.wave,
        )
        with self._task_lock:
            for client in batch.batch:
                task = batch.for_client(client)
                try:
                    try:
                        outcome = self._train(task, spec)
                    except data.DataMismatch as error:
                        raise TaskFailed(f"client {client}: local data does not match the job: {error}") from None
                except (TaskFailed, local_data.LocalDataInvalid, local_data.LocalDataMissing) as error:
                    self._report_failure(task, error, identity=None)
                    continue
                TASKS_PROCESSED.labels(outcome=outcome).inc()

    def _report_failure(self, task: TrainTask | EvaluateTask, error: Exception, identity: str | None) -> None:
        """A client's task failed for a reason of its own: counted, logged, and told to the scheduler."""
        TASKS_PROCESSED.labels(outcome="failed").inc()
        log.error(
            "%s: task of %s round %d client %d failed: %s", self.name, task.job_id, task.round, task.client, error
        )
        failed = ClientFailed(job_id=task.job_id, round=task.round, client=task.client, reason=str(error)[:4000])
        self.bus.publish(self.queues.events, self.auth.seal(self._signed_failure(failed, identity)))

    def _handle_one(self, task: TrainTask | EvaluateTask) -> None:
        job_id = task.job_id
        identity: str | None = None
        try:
            try:
                spec = self._spec(job_id)
            except JobNotFound:
                raise InvalidMessage(f"task for unknown job {task.job_id}") from None
            except ValidationError as error:
                # The spec names something this worker lacks (e.g. a local model folder it does not mount).
                raise TaskFailed(f"the job's spec does not load here: {format_validation_error(error)}") from None
            if task.client >= spec.num_clients:
                raise InvalidMessage(f"client {task.client} out of range for job {task.job_id}")
            identity = spec.clients.identity(task.client)
            if (identity is None) != (not self.clients) or (identity is not None and identity not in self.clients):
                # A bound client's task only in its own worker; a pool job's only in a pool worker.
                held = ", ".join(self.clients) or "none (a pool worker)"
                raise InvalidMessage(f"task for client {identity or task.client} of {job_id}; this worker holds {held}")
            sources = {name: client.data for name, client in self.clients.items()}
            if isinstance(task, TrainTask):
                _check_budget(task, spec)
            try:
                with self._task_lock, local_data.using(sources):
                    outcome = self._evaluate(task, spec) if isinstance(task, EvaluateTask) else self._train(task, spec)
            except data.DataMismatch as error:
                # This worker's copy of the data does not fit the job (a missing field, a label outside
                # its classes): the client cannot take part, the round goes on without it.
                raise TaskFailed(f"client {task.client}: local data does not match the job: {error}") from None
        except (TaskFailed, local_data.LocalDataInvalid, local_data.LocalDataMissing) as error:
            # Deterministic: a retry would fail the same way. Dead-lettered (and counted) by the bus.
            self._report_failure(task, error, identity)
            raise InvalidMessage(f"task failed: {error}") from None
        TASKS_PROCESSED.labels(outcome=outcome).inc()

    def _authenticate(self, task: TrainTask | EvaluateTask) -> None:
        """A bound client's queue takes messages from any broker user that may publish: only a task the
        scheduler signed runs (else dead-lettered and counted), before anything else is done for it."""
        try:
            if self.scheduler_key is None:
                raise IdentityError("no scheduler key is configured (--scheduler-key): bound tasks cannot be verified")
            self.scheduler_key.verify(task.model_dump(mode="json", exclude={"signature"}), task.signature)
        except IdentityError as error:
            TASKS_PROCESSED.labels(outcome="unauthenticated").inc()
            log.warning("%s: refused a task of %s client %d: %s", self.name, task.job_id, task.client, error)
            raise InvalidMessage(f"task of {task.job_id} client {task.client}: {error}") from None

    def _signed_failure(self, failed: ClientFailed, identity: str | None) -> ClientFailed:
        """A bound client's failure, signed with its key: the scheduler logs it only so signed."""
        if identity is None and len(self.clients) == 1:
            # The spec did not load here, so the task's identity is unknown: this worker speaks only for its
            # one client (a task for another is refused by the scheduler's check of the signature).
            identity = next(iter(self.clients))
        if identity is None or identity not in self.clients:
            return failed  # a pool client's: nothing to sign
        fields = failed.model_dump(mode="json", exclude={"signature"})
        return failed.model_copy(update={"signature": self.clients[identity].signer.sign(fields, "failure")})

    def _spec(self, job_id: str) -> JobSpec:
        if job_id not in self._specs:
            if len(self._specs) > 256:
                self._specs.clear()  # specs never change; this only bounds memory
            self._specs[job_id] = self.state.jobs.spec(job_id)
        return self._specs[job_id]

    def _train(self, task: TrainTask, spec: JobSpec) -> str:
        job_id = task.job_id
        if self.state.jobs.state(job_id) != JobState.RUNNING or self.state.rounds.is_committed(job_id, task.round):
            log.info("dropping stale task %s round %d client %d", job_id, task.round, task.client)
            return "stale"
        announced = self.state.tensors.announcement(job_id, task.round, task.client, task.wave)
        if announced is not None:
            # A redelivered task whose update is already stored: announce again, never train twice.
            self.bus.publish(self.queues.aggregate, announced)
            return "duplicate"
        start_state = self._global_state(job_id, task.round - 1)
        if start_state is None:
            log.info("no global state for %s round %d: stale task", job_id, task.round - 1)
            return "stale"
        version = (task.round, task.wave)
        personal_from, personal = self._personal_state(job_id, task.client, before=version)
        residual_from, residual = self._residual(job_id, task.client, before=version)
        log.info(
            "%s starting %s round %d client %d wave %d (personal state: %s)",
            self.name,
            *_where(task),
            f"v{personal_from}" if personal else "initial",
        )
        began = time.perf_counter()
        model, tokenizer = self.models.get(spec)
        load_trainable_state(model, {**start_state, **personal})
        context = LocalContext(
            spec=spec,
            task=task,
            model=model,
            tokenizer=tokenizer,
            examples=data.client_examples(spec, task.client),
            start_state=start_state,
            # The mode sees the client's residual beside its personal tensors (RESIDUAL_PREFIX names).
            personal={**personal, **{RESIDUAL_PREFIX + name: value for name, value in residual.items()}},
            artifact=lambda name, round_: self._artifact(job_id, name, round_),
            cache_dir=self.cache_dir,
            round_uploads=lambda wave: self._round_uploads(job_id, task.round, wave),
            secrets=_ClientSecrets(self.state.tensors, job_id, task.client),
        )
        result = mode_of(spec).run_local(context)
        personal_after, residual_after = split_residual(result.personal)
        if personal_after:
            blob = encode_tensors(personal_after, "float32", spec.compression.zstd_level)
            self.client_tensors.put_personal(job_id, task.client, version, blob)
        if residual_after:
            blob = encode_tensors(residual_after, "float32", spec.compression.zstd_level)
            CLIENT_STATE_BYTES.labels(direction="write").inc(len(blob))
            self.client_tensors.put_residual(job_id, task.client, version, blob, read=residual_from)
        compute_s = time.perf_counter() - began
        TASK_DURATION.observe(compute_s)
        self._upload(task, result, num_samples=len(context.examples), compute_s=compute_s)
        return "done"

    def _upload(self, task: TrainTask, result: LocalResult, num_samples: int, compute_s: float) -> None:
        """Store the update, then its announcement, then announce: a crash in between re-trains nothing."""
        tensors = self.state.tensors
        key = tensors.update_key(task.job_id, task.round, task.client, task.wave, task.attempt)
        tensors.put_update(key, result.payload)
        announce = UpdateReady(
            job_id=task.job_id,
            round=task.round,
            client=task.client,
            attempt=task.attempt,
            wave=task.wave,
            key=key,
            num_samples=num_samples,
            train_loss=result.loss,
            compute_s=compute_s,
            upload_bytes=len(result.payload),
            perturbations=result.perturbations,
            cosine=result.cosine,
            flops=result.flops,
        )
        message = self.auth.seal(self._signed(task, announce, result.payload))
        tensors.put_announcement(task.job_id, task.round, task.client, task.wave, message)
        self.bus.publish(self.queues.aggregate, message)
        UPLOAD_BYTES.inc(len(result.payload))
        log.info(
            "%s trained %s round %d client %d wave %d: loss %.4f in %.2fs, %d bytes up",
            self.name,
            *_where(task),
            result.loss,
            compute_s,
            len(result.payload),
        )

    def _signed(self, task: TrainTask, announce: UpdateReady, payload: bytes) -> UpdateReady:
        """The update with its blob's digest (every update: the aggregator merges no other blob), and a bound
        client's signature with its key over every field, digest included."""
        spec = self._spec(task.job_id)
        identity = spec.clients.identity(task.client)
        with_digest = announce.model_copy(update={"digest": payload_digest(payload)})
        if identity is None:
            return with_digest
        signature = self.clients[identity].signer.sign(with_digest.model_dump(mode="json", exclude={"signature"}))
        return with_digest.model_copy(update={"signature": signature})

    # -- client-side evaluation -------------------------------------------------------------

    def _evaluate(self, task: EvaluateTask, spec: JobSpec) -> str:
        """Global vs personalized model on this client's held-out data; publish the personalized one."""
        if self.state.jobs.state(task.job_id) != JobState.RUNNING:
            return "stale"
        global_state = self._global_state(task.job_id, task.round)
        if global_state is None:
            return "stale"  # the job moved on and the state was pruned
        _, personal = self._personal_state(task.job_id, task.client, before=(task.round + 1, 0))
        model, tokenizer = self.models.get(spec)
        evaluation = mode_of(spec).evaluate_client(
            EvaluationContext(
                spec=spec,
                job_id=task.job_id,
                round=task.round,
                client=task.client,
                model=model,
                tokenizer=tokenizer,
                global_state=global_state,
                personal=personal,
                cache_dir=self.cache_dir,
            )
        )
        if task.publish:  # the mode left the client's personalized state in the model
            self.state.tensors.put_archive(task.job_id, f"client-{task.client}", peft_folder_archive(model))
        event = ClientEvaluated(
            job_id=task.job_id,
            round=task.round,
            client=task.client,
            metrics=evaluation.figures,
            samples=evaluation.samples,
        )
        identity = spec.clients.identity(task.client)
        if identity is not None:  # the scheduler takes a bound client's figures only signed by that client
            fields = event.model_dump(mode="json", exclude={"signature"})
            event = event.model_copy(update={"signature": self.clients[identity].signer.sign(fields, "evaluation")})
        self.bus.publish(self.queues.events, self.auth.seal(event))
        return "evaluated"

    # -- state kept in the store between tasks ----------------------------------------------

    def _global_state(self, job_id: str, round_: int) -> State | None:
        """The global state committed at `round_`: cached, caught up with the rounds' deltas, or downloaded."""
        cached = self._states.get(job_id)
        if cached is not None and cached.round == round_:
            self._states.move_to_end(job_id)
            return cached.state
        if cached is not None and cached.round < round_:
            caught_up = self._catch_up(job_id, cached, round_)
            if caught_up is not None:
                return caught_up
        blob = self.state.tensors.global_state(job_id, round_)
        if blob is None:
            return None
        DOWNLOAD_BYTES.inc(len(blob))
        try:
            state = decode_tensors(blob)
        except CodecError as error:
            raise RuntimeError(f"global state of {job_id} round {round_} is corrupt: {error}") from error
        self._remember(job_id, _Cached(round_, state))
        return state

    def _catch_up(self, job_id: str, cached: _Cached, round_: int) -> State | None:
        """Apply the committed deltas after `cached.round` up to `round_`; None if one is gone or does not fit."""
        current = cached
        for step in range(cached.round + 1, round_ + 1):
            blob = self.state.tensors.download_delta(job_id, step)
            if blob is None:
                return None
            DOWNLOAD_BYTES.inc(len(blob))
            try:
                update = decode_update(blob, expected=current.state)
            except CodecError as error:
                log.warning("delta of %s round %d is unusable (%s): downloading the state", job_id, step, error)
                return None
            if update.meta.get("base") != current.fingerprint():
                log.warning("delta of %s round %d does not apply to the cached state: downloading it", job_id, step)
                return None
            current = _Cached(step, apply_delta(current.state, update.tensors))
        self._remember(job_id, current)
        return current.state

    def _remember(self, job_id: str, cached: _Cached) -> None:
        self._states[job_id] = cached
        self._states.move_to_end(job_id)
        while len(self._states) > _CACHED_JOBS:
            self._states.popitem(last=False)

    def _residual(self, job_id: str, client: int, before: PersonalVersion) -> tuple[PersonalVersion | None, State]:
        """The client's error-feedback residual as its last task left it: (version, residual)."""
        found = self.client_tensors.latest_residual(job_id, client, before)
        if found is None:
            return None, {}
        version, blob = found
        CLIENT_STATE_BYTES.labels(direction="read").inc(len(blob))
        return version, decode_tensors(blob)

    def _personal_state(self, job_id: str, client: int, before: PersonalVersion) -> tuple[str, State]:
        """The client's personal tensors as it left them last time (before `before`): (version, state)."""
        found = self.client_tensors.latest_personal(job_id, client, before)
        if found is None:
            return "", {}
        version, blob = found
        DOWNLOAD_BYTES.inc(len(blob))
        return f"{version[0]}.{version[1]}", decode_tensors(blob)

    def _round_uploads(self, job_id: str, round_: int, wave: int) -> _RoundUploads:
        """The uploads merged into the round in `wave`, by client (what the server broadcasts)."""
        clients = [client for client, merged in self.state.rounds.merged(job_id, round_) if merged == wave]
        return _RoundUploads(self, job_id, round_, wave, clients)

    def _artifact(self, job_id: str, name: str, round_: int) -> dict[str, torch.Tensor] | None:
        blob = self.state.tensors.artifact(job_id, name, round_)
        return decode_tensors(blob) if blob is not None else None


def _check_budget(task: TrainTask, spec: JobSpec) -> None:
    """A task may ask for at most its job's full budget (what the scheduler gives without a deadline cut):
    a publisher cannot make a worker train longer than the job's spec says."""
    mode = mode_of(spec)
    ceiling = mode.task_fields(spec, mode.full_budget(spec))
    for name, asked in (("local_steps", task.local_steps), ("perturbations", task.perturbations)):
        if asked > ceiling.get(name, 0):
            MESSAGES_REJECTED.labels(reason="task_budget").inc()
            raise InvalidMessage(f"task asks for {name}={asked}; job {task.job_id} allows at most {ceiling.get(name)}")


class _RoundUploads(Mapping[int, bytes]):
    """A wave's merged uploads by client, each read from the store when first looked up (a client
    reads only what it needs of its peers' uploads, e.g. their keys and not their masked vectors)."""

    def __init__(self, worker: Worker, job_id: str, round_: int, wave: int, clients: list[int]) -> None:
        self.worker, self.job_id, self.round, self.wave = worker, job_id, round_, wave
        self.clients = clients
        self._read: dict[int, bytes] = {}

    def __getitem__(self, client: int) -> bytes:
        if client not in self.clients:
            raise KeyError(client)
        if client not in self._read:
            tensors = self.worker.state.tensors
            raw = tensors.announcement(self.job_id, self.round, client, self.wave)
            announce = (
                decode_aggregator(raw, self.worker.max_message_bytes, self.worker.auth) if raw is not None else None
            )
            blob = tensors.update(announce.key) if isinstance(announce, UpdateReady) else None
            if blob is None:
                raise RuntimeError(
                    f"merged upload of client {client} wave {self.wave} in {self.job_id} round {self.round} is gone"
                )
            DOWNLOAD_BYTES.inc(len(blob))
            self._read[client] = blob
        return self._read[client]

    def __iter__(self) -> Iterator[int]:
        return iter(self.clients)

    def __len__(self) -> int:
        return len(self.clients)


@dataclass(frozen=True)
class _ClientSecrets:
    """`shared.modes.base.ClientSecrets` of one client, in the store under the client's key."""

    tensors: TensorRepository
    job_id: str
    client: int

    def get(self, name: str) -> bytes | None:
        return self.tensors.client_secret(self.job_id, self.client, name)

    def put(self, name: str, value: bytes) -> None:
        self.tensors.put_client_secret(self.job_id, self.client, name, value)


def _where(task: TrainTask) -> tuple[str, int, int, int]:
    return task.job_id, task.round, task.client, task.wave
