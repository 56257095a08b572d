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
from shared.evaluation import evaluate
from shared.forward_grad import ParamSpace
from shared.jobs import JobNotFound, JobState, read_spec, read_state
from shared.messages import (
    ClientEvaluated,
    EvaluateTask,
    InvalidMessage,
    TrainTask,
    UpdateReady,
    decode_task,
    encode,
)
from shared.metrics import DOWNLOAD_BYTES, TASK_DURATION, TASKS_PROCESSED, UPLOAD_BYTES
from shared.models import ModelCache, load_trainable_state, model_info, peft_folder_archive, trainable_state
from shared.personalization import is_personal
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
        outcome = self._evaluate(task, spec) if isinstance(task, EvaluateTask) else self._process(task, spec)
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

        version = personal_version(task.round, task.wave)
        personal_from, personal = self._personal_state(task.job_id, task.client, before=version)
        log.info(
            "%s starting %s round %d client %d wave %d (personal state: %s)",
            self.name,
            *_where(task),
            f"v{personal_from}" if personal else "initial",
        )
        began = time.perf_counter()
        model, tokenizer = self.models.get(spec)
        load_trainable_state(model, {**start_state, **personal})
        examples = data.client_examples(spec, task.client)
        task_kind = model_info(spec.model).task
        shared_names = [name for name in start_state if not is_personal(spec, name)]
        perturbations, cosine = 0, 0.0
        if spec.mode == "fwd":
            budget = task.perturbations or spec.fwd.perturbations_per_task
            result = forward_task(
                model,
                tokenizer,
                examples,
                spec,
                task_kind,
                round_=task.round,
                client=task.client,
                wave=task.wave,
                perturbations=budget,
                reference=self._reference_gradient(task, spec),
            )
            blob, loss = result.payload, result.loss
            perturbations, cosine, flops = result.perturbations, result.cosine, result.flops
            # The client moves its own personal part along its own estimate; only seeds go up.
            personal_after = {
                name: personal.get(name, start_state[name]) - spec.fwd.lr * step
                for name, step in result.local_step.items()
                if is_personal(spec, name)
            }
        else:
            seed = derive_seed("train", spec.seed, task.round, task.client)
            trained = train_backprop(model, tokenizer, examples, spec, task_kind, task.local_steps, seed)
            after = trainable_state(model)
            delta = {name: after[name] - start_state[name] for name in shared_names}
            blob = encode_tensors(delta, spec.compression.dtype, spec.compression.zstd_level)
            loss, flops = trained.loss, trained.flops
            personal_after = {name: after[name] for name in after if is_personal(spec, name)}
        if personal_after:
            self._store_personal(task.job_id, task.client, version, personal_after, spec)
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
                flops=flops,
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

    # -- client-side evaluation -------------------------------------------------------------

    def _evaluate(self, task: EvaluateTask, spec: JobSpec) -> str:
        """Global vs personalized model on this client's held-out data; publish the personalized one."""
        if read_state(self.store, self.keys, task.job_id) != JobState.RUNNING:
            return "stale"
        blob = self.store.get(self.keys.global_state(task.job_id, task.round))
        if blob is None:
            return "stale"  # the job moved on and the state was pruned
        global_state = decode_tensors(blob)
        _, personal = self._personal_state(task.job_id, task.client, before=personal_version(task.round + 1, 0))
        model, tokenizer = self.models.get(spec)
        examples = data.client_test_examples(spec, task.client, spec.personalization.eval_examples_per_client)
        task_kind = model_info(spec.model).task
        load_trainable_state(model, global_state)
        global_figures = evaluate(model, tokenizer, examples, task_kind, spec.max_length)
        personal_figures = global_figures  # with nothing personal, the client's model is the global one
        if personal:
            load_trainable_state(model, {**global_state, **personal})
            personal_figures = evaluate(model, tokenizer, examples, task_kind, spec.max_length)
        if task.publish:
            self.store.put(self.keys.model_archive(task.job_id, f"client-{task.client}"), peft_folder_archive(model))
        metrics = {
            "global_accuracy": global_figures["accuracy"],
            "global_loss": global_figures["loss"],
            "personalized_accuracy": personal_figures["accuracy"],
            "personalized_loss": personal_figures["loss"],
            "examples": float(len(examples)),
        }
        self.bus.publish(
            self.queues.events,
            encode(ClientEvaluated(job_id=task.job_id, round=task.round, client=task.client, metrics=metrics)),
        )
        return "evaluated"

    # -- personal state: the client's own tensors, kept in the store between its tasks -------

    def _personal_state(self, job_id: str, client: int, before: int) -> tuple[int, dict[str, torch.Tensor]]:
        """The client's personal tensors as it left them last time (before `before`): (version, state)."""
        versions = [int(v) for v in self.store.set_members(self.keys.personal_rounds(job_id, client))]
        earlier = [v for v in versions if v < before]
        if not earlier:
            return -1, {}
        blob = self.store.get(self.keys.personal_state(job_id, client, max(earlier)))
        if blob is None:
            raise RuntimeError(f"personal state {max(earlier)} of client {client} in {job_id} is gone")
        state = decode_tensors(blob)
        DOWNLOAD_BYTES.inc(len(blob))
        return max(earlier), state

    def _store_personal(
        self, job_id: str, client: int, version: int, state: dict[str, torch.Tensor], spec: JobSpec
    ) -> None:
        # Written under its own version, so a redelivered task still reads the state it started from.
        blob = encode_tensors(state, "float32", spec.compression.zstd_level)
        self.store.put(self.keys.personal_state(job_id, client, version), blob, self.update_ttl_s)
        self.store.set_add(self.keys.personal_rounds(job_id, client), str(version))

    def _reference_gradient(self, task: TrainTask, spec: JobSpec) -> torch.Tensor | None:
        """The previous step's global gradient (flattened over the perturbed tensors), if any."""
        if not spec.fwd.discriminative or task.round < 2:
            return None
        blob = self.store.get(self.keys.global_gradient(task.job_id, task.round - 1))
        if blob is None:
            return None
        gradient = decode_tensors(blob)
        return ParamSpace.from_state(gradient).flatten(gradient)


def personal_version(round_: int, wave: int) -> int:
    """Orders a client's personal states by (round, wave)."""
    return round_ * 10_000 + wave


def _where(task: TrainTask) -> tuple[str, int, int, int]:
    return task.job_id, task.round, task.client, task.wave
