"""Merges updates as they arrive and commits rounds atomically.

Truth lives in the store; the in-memory running sums are a cache. The set of clients
merged into a round is recorded in the store right after each merge, and a round is
committed in one transaction (new global state, round record, metrics, published
model, cleanup). After a restart a round's running sum is rebuilt from the stored
updates of the clients in that set, so nothing merged is lost or merged twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import torch

from services.aggregator.rounds import RoundAccumulator
from shared import data
from shared.bus import Bus, Queues
from shared.codec import CodecError, decode_tensors, encode_tensors
from shared.evaluation import evaluate, evaluation_subset
from shared.forward_grad import UploadError
from shared.jobs import JobNotFound, JobState, read_spec, read_state
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
    UpdateMerged,
    UpdateReady,
    decode_aggregator,
    encode,
)
from shared.metrics import (
    DEVICE_DELAY,
    DEVICE_ENERGY,
    FWD_COSINE,
    FWD_PERTURBATIONS,
    FWD_VARIANCE,
    GLOBAL_ACCURACY,
    GLOBAL_LOSS,
    ROUNDS_COMMITTED,
    UPDATES_RECEIVED,
)
from shared.models import (
    ModelCache,
    initial_state,
    load_trainable_state,
    model_info,
    peft_folder_archive,
)
from shared.seeding import derive_seed
from shared.spec import JobSpec
from shared.store import Keys, Store

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
    ) -> None:
        self.bus = bus
        self.store = store
        self.keys = Keys(namespace)
        self.queues = Queues(namespace)
        self.models = ModelCache(cache_dir)
        self.max_message_bytes = max_message_bytes
        self.max_update_bytes = max_update_bytes
        self._rounds: dict[tuple[str, int], RoundAccumulator] = {}

    def run(self, stop: threading.Event) -> None:
        log.info("aggregator consuming %s", self.queues.aggregate)
        self.bus.consume(self.queues.aggregate, self.handle, stop)

    def handle(self, body: bytes) -> None:
        message = decode_aggregator(body, self.max_message_bytes)
        try:
            spec = read_spec(self.store, self.keys, message.job_id)
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
        self.bus.publish(self.queues.events, encode(message))

    def _forget(self, job_id: str) -> None:
        for key in [k for k in self._rounds if k[0] == job_id]:
            del self._rounds[key]

    # -- round 0 --------------------------------------------------------------------------

    def _init(self, job_id: str, spec: JobSpec) -> None:
        committed = self.store.get(self.keys.round_committed(job_id, 0))
        if committed is not None:
            record = msgpack.unpackb(committed)
            self._emit(JobInitialized(job_id=job_id, metrics=record["metrics"]))
            return
        model, _ = self.models.get(spec)
        state = initial_state(model, derive_seed("init", spec.seed))
        began = time.perf_counter()
        metrics = self._evaluate(spec, state)
        metrics["eval_s"] = time.perf_counter() - began
        record = {"round": 0, "clients": [], "metrics": metrics}
        batch = self.store.batch()
        batch.put(self.keys.global_state(job_id, 0), encode_tensors(state, _STATE_DTYPE))
        batch.list_append(self.keys.metrics(job_id), msgpack.packb(record))
        batch.put(self.keys.round_committed(job_id, 0), msgpack.packb(record))
        batch.execute()
        log.info("job %s initialized: %s", job_id, _fmt(metrics))
        self._emit(JobInitialized(job_id=job_id, metrics=metrics))

    # -- merging --------------------------------------------------------------------------

    def _merge(self, announce: UpdateReady, spec: JobSpec) -> None:
        keys, job_id, round_ = self.keys, announce.job_id, announce.round
        # Validate identity first: everything below trusts announce.key (it may even delete it).
        expected_key = keys.update(job_id, round_, announce.client, announce.wave, announce.attempt)
        if announce.key != expected_key:
            UPDATES_RECEIVED.labels(outcome="invalid").inc()
            raise InvalidMessage(f"update key {announce.key!r} does not match its job, round, client and wave")
        if (
            self.store.exists(keys.round_committed(job_id, round_))
            or read_state(self.store, keys, job_id) != JobState.RUNNING
        ):
            UPDATES_RECEIVED.labels(outcome="late").inc()
            self.store.delete(announce.key)
            log.info("late update for %s round %d client %d dropped", job_id, round_, announce.client)
            return
        member = f"{announce.client}:{announce.wave}"
        merged = self.store.set_members(keys.round_merged(job_id, round_))
        if member in merged:
            UPDATES_RECEIVED.labels(outcome="duplicate").inc()
            # Say it again: the first announcement may have died with a previous process.
            self._emit(UpdateMerged(job_id=job_id, round=round_, client=announce.client, merged_count=len(merged)))
            return
        planned = self.store.hash_get(keys.round_plan(job_id, round_), "clients")
        if planned is None or announce.client not in json.loads(planned):
            UPDATES_RECEIVED.labels(outcome="invalid").inc()
            raise InvalidMessage(f"client {announce.client} was not sampled in {job_id} round {round_}")
        blob = self.store.get(announce.key)
        try:
            accumulator = self._accumulator(job_id, round_, spec)
            if blob is None:
                raise KeyError("no stored update under that key")
            merge = accumulator.decode(announce, blob, self.max_update_bytes)
        except (CodecError, UploadError, KeyError, MissingState) as error:
            UPDATES_RECEIVED.labels(outcome="invalid").inc()
            raise InvalidMessage(f"update {announce.key}: {error}") from None
        merge()
        self.store.set_add(keys.round_merged(job_id, round_), member)
        UPDATES_RECEIVED.labels(outcome="merged").inc()
        self._emit(
            UpdateMerged(job_id=job_id, round=round_, client=announce.client, merged_count=len(accumulator.merged))
        )

    def _global(self, job_id: str, round_: int) -> dict[str, torch.Tensor]:
        blob = self.store.get(self.keys.global_state(job_id, round_))
        if blob is None:
            raise MissingState(f"global state of {job_id} round {round_} is missing")
        return decode_tensors(blob, self.max_update_bytes)

    def _accumulator(self, job_id: str, round_: int, spec: JobSpec) -> RoundAccumulator:
        """The round's running aggregate, rebuilt from the store if this process has not seen it."""
        key = (job_id, round_)
        if key not in self._rounds:
            accumulator = RoundAccumulator(spec, self._global(job_id, round_ - 1))
            members = self.store.set_members(self.keys.round_merged(job_id, round_))
            for client, wave in sorted(tuple(int(x) for x in m.split(":")) for m in members):
                raw = self.store.get(self.keys.update_meta(job_id, round_, client, wave))
                if raw is None:
                    raise RuntimeError(f"merged update of client {client} in {job_id} round {round_} is gone")
                announce = UpdateReady.model_validate(msgpack.unpackb(raw))
                stored = self.store.get(announce.key)
                if stored is None:
                    raise RuntimeError(f"merged update {announce.key} is gone")
                accumulator.decode(announce, stored, self.max_update_bytes)()
            if accumulator.merged:
                log.info("rebuilt %s round %d from %d stored updates", job_id, round_, len(accumulator.merged))
            self._rounds[key] = accumulator
        return self._rounds[key]

    # -- committing -----------------------------------------------------------------------

    def _close(self, close: CloseRound, spec: JobSpec) -> None:
        keys, job_id, round_ = self.keys, close.job_id, close.round
        committed = self.store.get(keys.round_committed(job_id, round_))
        if committed is not None:
            record = msgpack.unpackb(committed)
            self._emit(
                RoundCommitted(job_id=job_id, round=round_, clients=record["clients"], metrics=record["metrics"])
            )
            return
        accumulator = self._accumulator(job_id, round_, spec)
        if accumulator.estimate is not None and accumulator.merged:
            self.store.list_append(
                keys.round_variances(job_id, round_), msgpack.packb(accumulator.estimate.variance_ratio())
            )
        if accumulator.wants_more_work(close.force):
            assert accumulator.estimate is not None
            variance = accumulator.estimate.variance_ratio()
            log.info(
                "job %s round %d: variance %.3g above threshold after %d perturbations; asking for more",
                job_id,
                round_,
                variance,
                accumulator.estimate.count,
            )
            self._emit(
                MoreWork(
                    job_id=job_id,
                    round=round_,
                    wave=accumulator.next_wave(),
                    variance=variance,
                    perturbations=accumulator.estimate.count,
                )
            )
            return

        previous_blob = self.store.get(keys.global_state(job_id, round_ - 1))
        if previous_blob is None:
            raise RuntimeError(f"global state of round {round_ - 1} is missing")
        previous = decode_tensors(previous_blob, self.max_update_bytes)
        momentum_blob = self.store.get(keys.server_momentum(job_id, round_ - 1))
        momentum = decode_tensors(momentum_blob, self.max_update_bytes) if momentum_blob else None
        began = time.perf_counter()
        step = accumulator.apply(previous, momentum, round_)
        aggregate_s = time.perf_counter() - began
        began = time.perf_counter()
        metrics = self._evaluate(spec, step.state)
        metrics.update(step.figures)
        metrics.update(
            train_loss=accumulator.loss_weighted / (accumulator.weight or 1.0),
            num_clients=float(len(accumulator.clients)),
            updates=float(len(accumulator.merged)),
            bytes_up=float(accumulator.upload_bytes),
            bytes_down=float(len(previous_blob) * len(accumulator.merged)),
            compute_s_max=accumulator.compute_s_max,
            compute_s_sum=accumulator.compute_s_sum,
            aggregate_s=aggregate_s,
            eval_s=time.perf_counter() - began,
        )
        devices = accumulator.devices
        if devices:
            metrics.update(
                delay_s=max(d["delay_s"] for d in devices.values()),  # the round waits for the slowest device
                delay_s_mean=sum(d["delay_s"] for d in devices.values()) / len(devices),
                energy_j=sum(d["energy_j"] for d in devices.values()),
                upload_s_max=max(d["upload_s"] for d in devices.values()),
            )
            for figures in devices.values():
                DEVICE_DELAY.observe(figures["delay_s"])
                DEVICE_ENERGY.inc(figures["energy_j"])
        clients = accumulator.clients
        record = {
            "round": round_,
            "clients": clients,
            "metrics": metrics,
            "extra": {"devices": {str(c): d for c, d in sorted(devices.items())}},
        }
        archive = self._archive(spec, step.state)

        batch = self.store.batch()
        batch.put(keys.global_state(job_id, round_), encode_tensors(step.state, _STATE_DTYPE))
        if step.gradient is not None:
            batch.put(keys.global_gradient(job_id, round_), encode_tensors(step.gradient, _STATE_DTYPE))
        if step.momentum is not None:
            batch.put(keys.server_momentum(job_id, round_), encode_tensors(step.momentum, _STATE_DTYPE))
        batch.put(keys.round_committed(job_id, round_), msgpack.packb(record))
        batch.list_append(keys.metrics(job_id), msgpack.packb(record))
        batch.put(keys.model_archive(job_id, "global"), archive)
        for client, wave in accumulator.merged:
            batch.delete(keys.update_meta(job_id, round_, client, wave))
        if round_ >= 2:
            batch.delete(
                keys.global_state(job_id, round_ - 2),
                keys.global_gradient(job_id, round_ - 2),
                keys.server_momentum(job_id, round_ - 2),
            )
        batch.execute()
        # Update payloads go after the commit: a crash here leaves garbage (with a TTL), never a gap.
        self.store.delete_prefix(f"{keys.job_prefix(job_id)}round:{round_}:update:")
        self._rounds.pop((job_id, round_), None)

        ROUNDS_COMMITTED.inc()
        GLOBAL_ACCURACY.labels(job=job_id).set(metrics["accuracy"])
        GLOBAL_LOSS.labels(job=job_id).set(metrics["loss"])
        if "perturbations" in metrics:
            FWD_PERTURBATIONS.observe(metrics["perturbations"])
            FWD_VARIANCE.labels(job=job_id).set(metrics["variance"])
            FWD_COSINE.labels(job=job_id).set(metrics["cosine"])
        log.info("job %s round %d committed from %d clients: %s", job_id, round_, len(clients), _fmt(metrics))
        self._emit(RoundCommitted(job_id=job_id, round=round_, clients=clients, metrics=metrics))

    def _evaluate(self, spec: JobSpec, state: dict[str, torch.Tensor]) -> dict[str, float]:
        model, tokenizer = self.models.get(spec)
        load_trainable_state(model, state)
        examples = evaluation_subset(data.load(spec.dataset, "test"), spec.eval_max_examples)
        return evaluate(model, tokenizer, examples, model_info(spec.model).task, spec.max_length)

    def _archive(self, spec: JobSpec, state: dict[str, torch.Tensor]) -> bytes:
        model, _ = self.models.get(spec)
        load_trainable_state(model, state)
        return peft_folder_archive(model)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
