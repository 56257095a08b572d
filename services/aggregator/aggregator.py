"""Merges updates as they arrive and commits rounds atomically.

Truth lives in the store; the in-memory running sums are a cache. The set of clients
merged into a round is recorded in the store right after each merge, and a round is
committed in one transaction (new global state, round record, metrics, published
model, cleanup). After a restart a round's running sum is rebuilt from the stored
updates of the clients in that set, so nothing merged is lost or merged twice.
What an update means (a delta, seed-scalar forward gradients, ...) is the job's training
mode's business (`shared.modes`); this class validates identity, dedups and commits.

With every round it also commits the round's delta for downloads (`compression.download`):
workers keep the previous state and apply it, so the committed state is defined as the
previous one plus the decoded delta (`shared.codec.apply_delta`), computed the same way here
and in every worker. A lossy download codec carries what it left out into the next round's
delta (server-side error feedback). The model is loaded and warmed when a job is initialized,
so no round's evaluation pays for that.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from services.aggregator.tally import OpenRound, RoundTally
from shared import data
from shared.adapters import ModelCache
from shared.bus import Bus, Queues
from shared.catalog import model_info
from shared.codec import Codec, apply_delta, decode_tensors, encode_tensors, encode_update, state_digest
from shared.evaluation import evaluate, evaluation_subset
from shared.identity import ClientRegistry, IdentityError, payload_digest
from shared.messages import (
    CloseRound,
    DropJob,
    InitJob,
    InvalidMessage,
    JobFailed,
    JobInitialized,
    MoreWork,
    RoundCommitted,
    SchedulerEvent,
    UpdateInvalid,
    UpdateMerged,
    UpdateReady,
    decode_aggregator,
)
from shared.metrics import (
    DP_EPSILON,
    GLOBAL_ACCURACY,
    GLOBAL_LOSS,
    MESSAGES_REJECTED,
    ROUNDS_COMMITTED,
    UPDATES_RECEIVED,
    forget_job,
)
from shared.models import initial_state, load_trainable_state, peft_folder_archive
from shared.modes import mode_of
from shared.modes.base import State, UpdateRejected
from shared.seeding import derive_seed
from shared.signing import BusAuth
from shared.spec import JobSpec
from shared.state import JobNotFound, JobState, Repositories, RoundCommit, RoundRecord
from shared.state.tensors import DOWNLOAD_DELTA, DOWNLOAD_RESIDUAL
from shared.store import Store

log = logging.getLogger(__name__)

# Global states are stored as float32 (no lossy cast): they are the source of truth.
_STATE_DTYPE = "float32"


class MissingState(RuntimeError):
    """A state the message presupposes does not exist (e.g. an update for a round never opened)."""


class Aggregator:
    def __init__(
        self,
        bus: Bus,
        store: Store,
        cache_dir: Path,
        namespace: str = "pwff",
        max_message_bytes: int = 64 * 1024,
        max_update_bytes: int = 512 * 1024 * 1024,
        identities: ClientRegistry | None = None,
        auth: BusAuth | None = None,
    ) -> None:
        self.bus = bus
        self.auth = auth if auth is not None else BusAuth.unsealed()
        """Seals what it publishes and checks what it consumes (shared.signing)."""
        self.identities = identities
        """Enrolled bound clients' keys (PWFF_CLIENTS_FILE); without it every bound client's update is refused."""
        self.state = Repositories(store, namespace)
        self.queues = Queues(namespace)
        self.models = ModelCache(cache_dir)
        self.max_message_bytes = max_message_bytes
        self.max_update_bytes = max_update_bytes
        self._rounds: dict[tuple[str, int], OpenRound] = {}

    def run(self, stop: threading.Event) -> None:
        log.info("aggregator consuming %s", self.queues.aggregate)
        self.bus.consume(self.queues.aggregate, self.handle, stop)

    def handle(self, body: bytes) -> None:
        message = decode_aggregator(body, self.max_message_bytes, self.auth)
        try:
            spec = self.state.jobs.spec(message.job_id)
        except JobNotFound:
            if isinstance(message, UpdateReady):
                UPDATES_RECEIVED.labels(outcome="invalid").inc()
            raise InvalidMessage(f"{message.type} for unknown job {message.job_id}") from None
        if isinstance(message, UpdateReady):
            self._merge(message, spec)
        elif isinstance(message, InitJob):
            self._guarded(message.job_id, lambda: self._init(message.job_id, spec))
        elif isinstance(message, CloseRound):
            self._guarded(message.job_id, lambda: self._close(message, spec))
        elif isinstance(message, DropJob):
            self._forget(message.job_id)

    def _guarded(self, job_id: str, action: Callable[[], None]) -> None:
        """Errors that no retry can fix (a model that fails to load) fail the job instead of looping."""
        try:
            action()
        except (ValueError, RuntimeError, OSError) as error:
            log.exception("job %s failed in the aggregator", job_id)
            self._emit(JobFailed(job_id=job_id, error=f"{type(error).__name__}: {error}"[:4000]))

    def _emit(self, message: SchedulerEvent) -> None:
        self.bus.publish(self.queues.events, self.auth.seal(message))

    def _forget(self, job_id: str) -> None:
        forget_job(job_id)
        for key in [k for k in self._rounds if k[0] == job_id]:
            del self._rounds[key]

    # -- round 0 --------------------------------------------------------------------------

    def _init(self, job_id: str, spec: JobSpec) -> None:
        job_state = self.state.jobs.state(job_id)
        if job_state is not None and job_state.final:
            # Cancelled (or failed) while its InitJob waited in the queue: loading and evaluating the model
            # now would hold every other job's updates behind work nobody will use.
            log.info("job %s already %s: not initialized", job_id, job_state)
            return
        committed = self.state.rounds.committed(job_id, 0)
        if committed is not None:
            self._emit(JobInitialized(job_id=job_id, metrics=committed.metrics))
            return
        began = time.perf_counter()
        model, _ = self.models.get(spec)
        state = initial_state(model, derive_seed("init", spec.seed))
        self._warm(spec, state)
        warm_s = time.perf_counter() - began
        began = time.perf_counter()
        metrics = self._evaluate(spec, state)
        metrics["eval_s"] = time.perf_counter() - began
        log.info("job %s: model loaded and warmed in %.2fs", job_id, warm_s)
        record = RoundRecord(round=0, metrics=metrics)
        self.state.rounds.commit(job_id, RoundCommit(record=record, state=encode_tensors(state, _STATE_DTYPE)))
        log.info("job %s initialized: %s", job_id, _fmt(metrics))
        self._emit(JobInitialized(job_id=job_id, metrics=metrics))

    # -- merging --------------------------------------------------------------------------

    def _merge(self, announce: UpdateReady, spec: JobSpec) -> None:
        job_id, round_ = announce.job_id, announce.round
        # Validate identity first: everything below trusts announce.key (it may even delete it).
        expected_key = self.state.tensors.update_key(job_id, round_, announce.client, announce.wave, announce.attempt)
        if announce.key != expected_key:
            UPDATES_RECEIVED.labels(outcome="invalid").inc()
            raise InvalidMessage(f"update key {announce.key!r} does not match its job, round, client and wave")
        identity = spec.clients.identity(announce.client)
        if identity is not None:
            self._authenticate(announce, identity)  # before anything acts on it (a late one's blob is deleted)
        if self.state.rounds.is_committed(job_id, round_) or self.state.jobs.state(job_id) != JobState.RUNNING:
            UPDATES_RECEIVED.labels(outcome="late").inc()
            self.state.tensors.drop_update(announce.key)
            log.info("late update for %s round %d client %d dropped", job_id, round_, announce.client)
            return
        merged = self.state.rounds.merged(job_id, round_)
        if (announce.client, announce.wave) in merged:
            UPDATES_RECEIVED.labels(outcome="duplicate").inc()
            # Say it again: the first announcement may have died with a previous process.
            rejected = len(self.state.rounds.rejected(job_id, round_))
            self._emit(
                UpdateMerged(
                    job_id=job_id,
                    round=round_,
                    client=announce.client,
                    merged_count=len(merged),
                    rejected_count=rejected,
                )
            )
            return
        planned = self.state.jobs.planned_clients(job_id, round_)
        if planned is None or announce.client not in planned:
            UPDATES_RECEIVED.labels(outcome="invalid").inc()
            raise InvalidMessage(f"client {announce.client} was not sampled in {job_id} round {round_}")
        blob = self.state.tensors.update(announce.key)
        try:
            open_round = self._open_round(job_id, round_, spec)
            if blob is None:
                raise UpdateRejected("no stored update under that key")
            if identity is not None and payload_digest(blob) != announce.digest:
                UPDATES_RECEIVED.labels(outcome="unauthenticated").inc()
                raise InvalidMessage(f"update {announce.key}: the stored blob is not the one client {identity} signed")
            _check_claims(announce, blob, spec)
            update = open_round.accumulator.validate(announce, blob, self.max_update_bytes)
        except UpdateRejected as error:
            self._reject(announce, str(error))
            raise InvalidMessage(f"update {announce.key}: {error}") from None
        except MissingState as error:
            UPDATES_RECEIVED.labels(outcome="invalid").inc()
            raise InvalidMessage(f"update {announce.key}: {error}") from None
        if open_round.accumulator.closes_waves and announce.wave < self._current_wave(job_id, round_):
            # The next wave was built on this wave's set without it (secure aggregation's U1, U2).
            UPDATES_RECEIVED.labels(outcome="late").inc()
            self.state.tensors.drop_update(announce.key)
            log.info(
                "late wave-%d update for %s round %d client %d dropped", announce.wave, job_id, round_, announce.client
            )
            return
        _apply(open_round, announce, update)
        self.state.rounds.add_merged(job_id, round_, announce.client, announce.wave)
        UPDATES_RECEIVED.labels(outcome="merged").inc()
        count = len(open_round.tally.merged)
        rejected = len(self.state.rounds.rejected(job_id, round_))
        self._emit(
            UpdateMerged(
                job_id=job_id, round=round_, client=announce.client, merged_count=count, rejected_count=rejected
            )
        )

    def _reject(self, announce: UpdateReady, reason: str) -> None:
        """A sampled client's upload that can never be merged (NaN/Inf, malformed, past a strategy's bound):
        counted, remembered for the round's record, and announced so the round closes from the valid ones
        instead of waiting for its deadline. The caller dead-letters the message."""
        job_id, round_ = announce.job_id, announce.round
        UPDATES_RECEIVED.labels(outcome="invalid").inc()
        self.state.rounds.add_rejected(job_id, round_, announce.client, announce.wave)
        log.warning("job %s round %d: update of client %d rejected: %s", job_id, round_, announce.client, reason)
        self._emit(
            UpdateInvalid(
                job_id=job_id,
                round=round_,
                client=announce.client,
                merged_count=len(self.state.rounds.merged(job_id, round_)),
                rejected_count=max(1, len(self.state.rounds.rejected(job_id, round_))),
                reason=reason[:1000],
            )
        )

    def _authenticate(self, announce: UpdateReady, identity: str) -> None:
        """A bound client's update must carry that client's signature, by its enrolled, unrevoked key."""
        try:
            if self.identities is None:
                raise IdentityError(
                    "no clients file is configured (PWFF_CLIENTS_FILE): bound clients cannot be verified"
                )
            self.identities.verify(
                identity, announce.model_dump(mode="json", exclude={"signature"}), announce.signature
            )
        except IdentityError as error:
            UPDATES_RECEIVED.labels(outcome="unauthenticated").inc()
            log.warning("rejected update %s: %s", announce.key, error)
            raise InvalidMessage(f"update {announce.key}: {error}") from None

    def _current_wave(self, job_id: str, round_: int) -> int:
        plan = self.state.jobs.plan(job_id, round_)
        return plan.wave if plan is not None else 0

    def _global(self, job_id: str, round_: int) -> tuple[State, int]:
        """The global state committed at `round_`, and its size on the wire."""
        blob = self.state.tensors.global_state(job_id, round_)
        if blob is None:
            raise MissingState(f"global state of {job_id} round {round_} is missing")
        return decode_tensors(blob, self.max_update_bytes), len(blob)

    def _open_round(self, job_id: str, round_: int, spec: JobSpec) -> OpenRound:
        """The round's running aggregate, rebuilt from the store if this process has not seen it."""
        key = (job_id, round_)
        if key not in self._rounds:
            start, _ = self._global(job_id, round_ - 1)
            open_round = OpenRound(mode_of(spec).accumulator(spec, start), RoundTally(spec))
            for client, wave in self.state.rounds.merged(job_id, round_):
                raw = self.state.tensors.announcement(job_id, round_, client, wave)
                if raw is None:
                    raise RuntimeError(f"merged update of client {client} in {job_id} round {round_} is gone")
                announce = decode_aggregator(raw, self.max_message_bytes, self.auth)
                if not isinstance(announce, UpdateReady):
                    raise RuntimeError(f"the stored announcement of client {client} in {job_id} is not an update")
                stored = self.state.tensors.update(announce.key)
                if stored is None:
                    raise RuntimeError(f"merged update {announce.key} is gone")
                _check_claims(announce, stored, spec)
                _apply(open_round, announce, open_round.accumulator.validate(announce, stored, self.max_update_bytes))
            if open_round.tally.merged:
                log.info("rebuilt %s round %d from %d stored updates", job_id, round_, len(open_round.tally.merged))
            self._rounds[key] = open_round
        return self._rounds[key]

    # -- committing -----------------------------------------------------------------------

    def _close(self, close: CloseRound, spec: JobSpec) -> None:
        job_id, round_ = close.job_id, close.round
        committed = self.state.rounds.committed(job_id, round_)
        if committed is not None:
            self._emit(
                RoundCommitted(job_id=job_id, round=round_, clients=committed.clients, metrics=committed.metrics)
            )
            return
        open_round = self._open_round(job_id, round_, spec)
        more = open_round.accumulator.wants_more_work(close.force)
        if more is not None and open_round.tally.next_wave() <= self._current_wave(job_id, round_):
            # That wave went out and closed with nothing of it merged: asking again would be ignored
            # (the scheduler dedups waves) and the round would never end. Commit what there is.
            log.warning(
                "job %s round %d: wave %d brought no update; committing", job_id, round_, open_round.tally.next_wave()
            )
            more = None
        if more is not None:
            log.info(
                "job %s round %d: variance %.3g after %d perturbations; asking for more",
                job_id,
                round_,
                more.variance,
                more.perturbations,
            )
            wave = open_round.tally.next_wave()
            self._emit(
                MoreWork(
                    job_id=job_id, round=round_, wave=wave, variance=more.variance, perturbations=more.perturbations
                )
            )
            return
        self._commit(job_id, round_, spec, open_round)

    def _commit(self, job_id: str, round_: int, spec: JobSpec, open_round: OpenRound) -> None:
        mode, tally = mode_of(spec), open_round.tally
        previous, previous_bytes = self._global(job_id, round_ - 1)
        began = time.perf_counter()
        step = open_round.accumulator.commit(previous, lambda name: self._artifact(job_id, name, round_ - 1), round_)
        state, downloads = self._downloadable(job_id, round_, spec, previous, step.state)
        aggregate_s = time.perf_counter() - began
        began = time.perf_counter()
        metrics = self._evaluate(spec, state)
        metrics.update(step.figures)
        # What each task of this round downloaded on top of the previous round's state: that round's delta
        # (the whole initial state in round 1).
        previous_delta = self.state.tensors.download_delta(job_id, round_ - 1)
        bytes_down = len(previous_delta) if previous_delta is not None else previous_bytes
        metrics.update(
            tally.figures(bytes_down),
            aggregate_s=aggregate_s,
            eval_s=time.perf_counter() - began,
            download_delta_bytes=float(len(downloads[DOWNLOAD_DELTA])),
            rejected=float(len(self.state.rounds.rejected(job_id, round_))),
        )
        clients = step.clients if step.clients is not None else tally.clients
        record = RoundRecord(round=round_, clients=clients, metrics=metrics, extra=tally.extra())
        commit = RoundCommit(
            record=record,
            state=encode_tensors(state, _STATE_DTYPE),
            artifacts={
                **{name: encode_tensors(value, _STATE_DTYPE) for name, value in step.artifacts.items()},
                **downloads,
            },
            archive=self._archive(spec, state),
            merged=tally.merged,
            prune=(*mode.artifacts, DOWNLOAD_DELTA, DOWNLOAD_RESIDUAL),
        )
        self.state.rounds.commit(job_id, commit)
        self._rounds.pop((job_id, round_), None)

        ROUNDS_COMMITTED.inc()
        tally.observe_devices()
        GLOBAL_ACCURACY.labels(job_id=job_id).set(metrics["accuracy"])
        GLOBAL_LOSS.labels(job_id=job_id).set(metrics["loss"])
        if "dp_epsilon" in metrics:
            DP_EPSILON.labels(job_id=job_id).set(metrics["dp_epsilon"])
        if step.figures:
            mode.observe(job_id, step.figures)
        if round_ >= spec.rounds:
            forget_job(job_id)  # the last round: the job's series go (after a last scrape)
        log.info("job %s round %d committed from %d clients: %s", job_id, round_, len(clients), _fmt(metrics))
        self._emit(RoundCommitted(job_id=job_id, round=round_, clients=record.clients, metrics=metrics))

    def _downloadable(
        self, job_id: str, round_: int, spec: JobSpec, previous: State, target: State
    ) -> tuple[State, dict[str, bytes]]:
        """The state to commit and the artifacts workers download instead of it.

        The committed state is `previous` plus the decoded delta, exactly what a worker holding
        `previous` rebuilds. A lossy codec's residual (target - committed) joins the next round's delta.
        """
        codec = Codec.for_downloads(spec.compression)
        carried = None if codec.lossless else self._artifact(job_id, DOWNLOAD_RESIDUAL, round_ - 1)
        delta = {name: value - previous[name] for name, value in target.items()}
        if carried is not None:
            for name, value in carried.items():
                if name in delta:
                    delta[name] += value
        encoded = encode_update(
            delta,
            codec,
            seed=derive_seed("download", spec.seed, round_),
            meta={"round": round_, "base": state_digest(previous)},
        )
        state = apply_delta(previous, encoded.decoded)
        artifacts = {DOWNLOAD_DELTA: encoded.blob}
        if not codec.lossless:
            residual = {name: delta[name] - encoded.decoded[name] for name in delta}
            artifacts[DOWNLOAD_RESIDUAL] = encode_tensors(residual, _STATE_DTYPE)
        return state, artifacts

    def _warm(self, spec: JobSpec, state: State) -> None:
        """Load the held-out set and run the model once, so the first evaluation costs what later ones do."""
        model, tokenizer = self.models.get(spec)
        load_trainable_state(model, state)
        examples = evaluation_subset(data.load(spec.dataset, "test"), spec.eval_max_examples)
        evaluate(model, tokenizer, examples[:32], model_info(spec.model).task, spec.max_length)

    def _artifact(self, job_id: str, name: str, round_: int) -> State | None:
        blob = self.state.tensors.artifact(job_id, name, round_)
        return decode_tensors(blob, self.max_update_bytes) if blob is not None else None

    def _evaluate(self, spec: JobSpec, state: dict[str, torch.Tensor]) -> dict[str, float]:
        model, tokenizer = self.models.get(spec)
        load_trainable_state(model, state)
        examples = evaluation_subset(data.load(spec.dataset, "test"), spec.eval_max_examples)
        return evaluate(model, tokenizer, examples, model_info(spec.model).task, spec.max_length)

    def _archive(self, spec: JobSpec, state: dict[str, torch.Tensor]) -> bytes:
        model, _ = self.models.get(spec)
        load_trainable_state(model, state)
        return peft_folder_archive(model)


def _apply(open_round: OpenRound, announce: UpdateReady, update: object) -> None:
    open_round.accumulator.merge(announce, update)
    open_round.tally.add(announce, open_round.accumulator.weight(announce))


def _check_claims(announce: UpdateReady, blob: bytes, spec: JobSpec) -> None:
    """What an announcement says about its update that the aggregator can check before trusting it.

    The blob must be the one announced (its SHA-256 is in the announcement, under the message's MAC):
    whoever can write the store but not seal messages cannot swap a client's update. `num_samples`
    weighs the client in the mean, so it may not exceed what the client's shard holds (a pool client's: a
    bound client's data is not known here).
    """
    if not hmac.compare_digest(payload_digest(blob), announce.digest):
        MESSAGES_REJECTED.labels(reason="update_digest").inc()
        raise UpdateRejected("the stored blob is not the one announced (SHA-256 mismatch)")
    if spec.clients.kind == "bound":
        return  # a bound client's data is its own: no shard here to bound it by (its signature vouches)
    shard = len(data.client_indices(spec, announce.client))
    if announce.num_samples > shard:
        MESSAGES_REJECTED.labels(reason="num_samples").inc()
        raise UpdateRejected(
            f"num_samples {announce.num_samples} exceeds the {shard} examples of client {announce.client}"
        )


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
