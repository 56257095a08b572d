"""One task at a time: fetch the global state, train this client, store the update, announce it.

The worker keeps nothing between tasks that Redis cannot rebuild: the loaded base model
is a cache, and the trainable state is overwritten from the store at every task. The
bus acks a task only after `handle` returns, i.e. after the update is stored and
announced; a worker killed mid-task leaves the task to be redelivered to another.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch

from services.worker.forward import forward_task
from services.worker.trainer import train_backprop
from shared import data
from shared.bus import Bus, Queues
from shared.codec import CodecError, decode_tensors, encode_tensors
from shared.forward_grad import ParamSpace
from shared.jobs import JobNotFound, JobState, read_spec, read_state
from shared.messages import InvalidMessage, TrainTask, UpdateReady, decode_task, encode
from shared.metrics import DOWNLOAD_BYTES, TASK_DURATION, TASKS_PROCESSED, UPLOAD_BYTES
from shared.models import ModelCache, load_trainable_state, model_info, trainable_state
from shared.seeding import derive_seed
from shared.spec import JobSpec
from shared.store import Keys, Store

log = logging.getLogger(__name__)


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
    ) -> None:
        self.bus = bus
        self.store = store
        self.keys = Keys(namespace)
        self.queues = Queues(namespace)
        self.cache_dir = cache_dir
        self.update_ttl_s = update_ttl_s
        self.max_message_bytes = max_message_bytes
        self.name = name
        self.models = ModelCache(cache_dir)
        self._specs: dict[str, JobSpec] = {}

    def run(self, stop: threading.Event) -> None:
        log.info("%s consuming %s", self.name, self.queues.tasks)
        self.bus.consume(self.queues.tasks, self.handle, stop)

    # -- one task ---------------------------------------------------------------------------

    def handle(self, body: bytes) -> None:
        task = decode_task(body, self.max_message_bytes)
        try:
            spec = self._spec(task.job_id)
        except JobNotFound:
            raise InvalidMessage(f"task for unknown job {task.job_id}") from None
        if task.client >= spec.num_clients:
            raise InvalidMessage(f"client {task.client} out of range for job {task.job_id}")
        outcome = self._process(task, spec)
        TASKS_PROCESSED.labels(outcome=outcome).inc()

    def _spec(self, job_id: str) -> JobSpec:
        if job_id not in self._specs:
            if len(self._specs) > 256:
                self._specs.clear()  # specs never change; this only bounds memory
            self._specs[job_id] = read_spec(self.store, self.keys, job_id)
        return self._specs[job_id]

    def _process(self, task: TrainTask, spec: JobSpec) -> str:
        keys = self.keys
        if read_state(self.store, keys, task.job_id) != JobState.RUNNING or self.store.exists(
            keys.round_committed(task.job_id, task.round)
        ):
            log.info("dropping stale task %s round %d client %d", task.job_id, task.round, task.client)
            return "stale"
        announced = self.store.get(keys.update_meta(task.job_id, task.round, task.client, task.wave))
        if announced is not None:
            # A redelivered task whose update is already stored: announce again, never train twice.
            self.bus.publish(self.queues.aggregate, announced)
            return "duplicate"
        start_blob = self.store.get(keys.global_state(task.job_id, task.round - 1))
        if start_blob is None:
            log.info("no global state for %s round %d: stale task", task.job_id, task.round - 1)
            return "stale"
        DOWNLOAD_BYTES.inc(len(start_blob))
        try:
            start_state = decode_tensors(start_blob)
        except CodecError as error:
            raise RuntimeError(f"global state of {task.job_id} is corrupt: {error}") from error

        log.info("%s starting %s round %d client %d wave %d", self.name, *_where(task))
        began = time.perf_counter()
        model, tokenizer = self.models.get(spec)
        load_trainable_state(model, start_state)
        examples = data.client_examples(spec, task.client)
        task_kind = model_info(spec.model).task
        perturbations, cosine = 0, 0.0
        if spec.mode == "fwd":
            result = forward_task(
                model,
                tokenizer,
                examples,
                spec,
                task_kind,
                round_=task.round,
                client=task.client,
                wave=task.wave,
                perturbations=task.perturbations or spec.fwd.perturbations_per_task,
                reference=self._reference_gradient(task, spec),
            )
            blob, loss = result.payload, result.loss
            perturbations, cosine = result.perturbations, result.cosine
        else:
            seed = derive_seed("train", spec.seed, task.round, task.client)
            trained = train_backprop(model, tokenizer, examples, spec, task_kind, task.local_steps, seed)
            after = trainable_state(model)
            delta = {name: after[name] - start_state[name] for name in start_state}
            blob = encode_tensors(delta, spec.compression.dtype, spec.compression.zstd_level)
            loss = trained.loss
        compute_s = time.perf_counter() - began
        TASK_DURATION.observe(compute_s)

        key = keys.update(task.job_id, task.round, task.client, task.wave, task.attempt)
        self.store.put(key, blob, self.update_ttl_s)
        message = encode(
            UpdateReady(
                job_id=task.job_id,
                round=task.round,
                client=task.client,
                attempt=task.attempt,
                wave=task.wave,
                key=key,
                num_samples=len(examples),
                train_loss=loss,
                compute_s=compute_s,
                upload_bytes=len(blob),
                perturbations=perturbations,
                cosine=min(1.0, cosine),
            )
        )
        self.store.put(keys.update_meta(task.job_id, task.round, task.client, task.wave), message, self.update_ttl_s)
        self.bus.publish(self.queues.aggregate, message)
        UPLOAD_BYTES.inc(len(blob))
        log.info(
            "%s trained %s round %d client %d wave %d: loss %.4f in %.2fs, %d bytes up",
            self.name,
            *_where(task),
            loss,
            compute_s,
            len(blob),
        )
        return "done"

    def _reference_gradient(self, task: TrainTask, spec: JobSpec) -> torch.Tensor | None:
        """The previous step's global gradient (flattened over the perturbed tensors), if any."""
        if not spec.fwd.discriminative or task.round < 2:
            return None
        blob = self.store.get(self.keys.global_gradient(task.job_id, task.round - 1))
        if blob is None:
            return None
        gradient = decode_tensors(blob)
        return ParamSpace.from_state(gradient).flatten(gradient)


def _where(task: TrainTask) -> tuple[str, int, int, int]:
    return task.job_id, task.round, task.client, task.wave
