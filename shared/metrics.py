"""Prometheus metrics of all services, defined once.

Defined here rather than in each service so the embedded mode (all three services in
one process) registers every name exactly once. Names follow Prometheus conventions:
`pwff_` prefix, `_total` counters, `_seconds` and `_bytes` units.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

from shared.bus import DeadLetterHook, Queues

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

JOBS_SUBMITTED = Counter("pwff_jobs_submitted_total", "Jobs accepted by the API")
JOBS_FINISHED = Counter("pwff_jobs_finished_total", "Jobs that reached a final state", ["state"])
JOBS_RUNNING = Gauge("pwff_jobs_running", "Jobs currently running")
ROUNDS_COMMITTED = Counter("pwff_rounds_committed_total", "Rounds committed by the aggregator")
ROUND_DURATION = Histogram(
    "pwff_round_duration_seconds", "Wall time from opening a round to its commit", buckets=_DURATION_BUCKETS
)
TASKS_DISPATCHED = Counter("pwff_tasks_dispatched_total", "Training tasks published by the scheduler")
TASKS_PROCESSED = Counter(
    "pwff_tasks_processed_total", "Tasks a worker finished, by outcome (done|stale|duplicate|failed)", ["outcome"]
)
TASK_DURATION = Histogram(
    "pwff_task_duration_seconds", "Worker compute time of one training task", buckets=_DURATION_BUCKETS
)
UPDATES_RECEIVED = Counter(
    "pwff_updates_received_total",
    "Updates seen by the aggregator, by outcome (merged|duplicate|late|invalid|unauthenticated)",
    ["outcome"],
)
UPLOAD_BYTES = Counter("pwff_upload_bytes_total", "Bytes of updates uploaded by workers")
DOWNLOAD_BYTES = Counter("pwff_download_bytes_total", "Bytes of model state downloaded by workers")
DEAD_LETTERED = Counter("pwff_messages_dead_lettered_total", "Messages sent to a dead-letter queue", ["queue"])
# Per-job series carry `job_id`, never `job`: Prometheus owns `job` (the scrape job) and would rename ours to
# `exported_job` unless every scrape config set honor_labels.
GLOBAL_ACCURACY = Gauge("pwff_global_accuracy", "Held-out accuracy of the latest global model", ["job_id"])
GLOBAL_LOSS = Gauge("pwff_global_loss", "Held-out loss of the latest global model", ["job_id"])
CLIENT_MEAN_FIGURE = Gauge(
    "pwff_client_mean_figure",
    "Mean over the clients evaluated after the latest round of a per-client figure (accuracy; align: each "
    "reward, the weighted reward, KL to the reference, response length), by model: global, personalized, reference",
    ["job_id", "model", "figure"],
)
HTTP_REQUESTS = Counter("pwff_http_requests_total", "HTTP API requests", ["method", "route", "status"])
STORE_STATE_LOST = Counter(
    "pwff_store_state_lost_total",
    "Times the scheduler found the store's state gone (its instance marker missing: e.g. Redis restarted without "
    "persistence); every job it knew unfinished was failed",
)
MESSAGES_REJECTED = Counter(
    "pwff_messages_rejected_total",
    "Bus messages refused before handling, by reason: missing_tag|bad_tag (authentication, shared.signing), "
    "update_digest (an update blob that is not the one announced), task_budget (a task over its job's budget), "
    "num_samples (an update claiming more examples than its client holds)",
    ["reason"],
)
LATE_TASKS = Counter("pwff_rounds_closed_at_deadline_total", "Rounds closed at their deadline with updates missing")


# Labelled counters export nothing for a label value until its first increment, and then 1: `increase()`
# and `rate()` need a sample before it, so the first failed job or dead letter would never show. Every label
# value known in advance starts at 0 (dead-letter queues depend on the namespace: `dead_letter_counter`).
for _state in ("succeeded", "failed", "cancelled"):
    JOBS_FINISHED.labels(state=_state)
for _outcome in ("done", "stale", "duplicate", "failed", "unauthenticated"):
    TASKS_PROCESSED.labels(outcome=_outcome)
EVALUATIONS_REJECTED = Counter(
    "pwff_evaluations_unauthenticated_total",
    "Bound clients' evaluations the scheduler refused: unsigned, signed by another key, or of a revoked client",
)
CLIENT_FAILURES_REJECTED = Counter(
    "pwff_client_failures_unauthenticated_total",
    "Bound clients' task failures (ClientFailed) the scheduler refused: unsigned, signed by another key, or of a "
    "revoked client",
)
for _outcome in ("merged", "duplicate", "late", "invalid", "unauthenticated"):
    UPDATES_RECEIVED.labels(outcome=_outcome)
for _reason in ("missing_tag", "bad_tag", "update_digest", "task_budget", "num_samples"):
    MESSAGES_REJECTED.labels(reason=_reason)


def count_dead_letter(queue: str, reason: str) -> None:
    DEAD_LETTERED.labels(queue=queue).inc()


def dead_letter_counter(namespace: str) -> DeadLetterHook:
    """The bus's dead-letter hook, with the counter of each of the namespace's queues started at 0."""
    for queue in Queues(namespace).all:
        DEAD_LETTERED.labels(queue=queue)
    return count_dead_letter


# The HTTP side (/metrics beside /healthz and /readyz, other paths 404) is shared.health's `serve_probes`.


FWD_PERTURBATIONS = Histogram(
    "pwff_fwd_perturbations_per_step",
    "fwd: perturbations used by a committed step (grows when variance control asks for more)",
    buckets=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
)
FWD_VARIANCE = Gauge("pwff_fwd_variance", "fwd: normalized split-half variance of the last committed step", ["job_id"])
FWD_COSINE = Gauge(
    "pwff_fwd_direction_cosine", "fwd: mean |cosine| of chosen directions with the previous gradient", ["job_id"]
)
FWD_EXTRA_WAVES = Counter("pwff_fwd_extra_waves_total", "fwd: extra perturbation waves dispatched by variance control")
DEVICE_DELAY = Histogram(
    "pwff_device_round_delay_seconds",
    "Simulated wireless delay (compute + upload) of one device's work in a round",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
DEVICE_ENERGY = Counter("pwff_device_energy_joules_total", "Simulated energy spent by devices (compute + upload)")

DP_EPSILON = Gauge(
    "pwff_dp_epsilon",
    "Differential privacy: epsilon spent by a job through its latest committed round, at its privacy.delta",
    ["job_id"],
)
# Every metric with a `job_id` label: their series of a job go when it ends (see `forget_job`).
PER_JOB: tuple[Gauge, ...] = (GLOBAL_ACCURACY, GLOBAL_LOSS, CLIENT_MEAN_FIGURE, FWD_VARIANCE, FWD_COSINE, DP_EPSILON)


def forget_job(job_id: str, linger_s: float | None = None) -> None:
    """Remove a finished job's per-job series, `linger_s` from now (default: PWFF_METRICS_JOB_LINGER_S).

    Not at once: the final figures of a job are the ones worth seeing, and a scrape must come first.
    Calling it again, or in another process's registry that never had the job, is harmless.
    """
    if linger_s is None:
        from shared.settings import Settings

        linger_s = Settings().metrics_job_linger_s
    if linger_s <= 0:
        _remove_job_series(job_id)
        return
    timer = threading.Timer(linger_s, _remove_job_series, args=(job_id,))
    timer.daemon = True  # a pending removal never holds a stopping process
    timer.start()


def _remove_job_series(job_id: str) -> None:
    for metric in PER_JOB:
        metric.remove_by_labels({"job_id": job_id})
