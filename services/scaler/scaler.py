"""Size the workers to the work, through the Kubernetes API.

One loop, every `interval_s`:

1. The shared worker Deployment: tasks waiting in the task queue (a passive declare: no
   management plugin) plus the consumers already busy give the workers wanted,
   ceil(waiting / tasks_per_worker) more than consume now, capped at `max_workers`. It never
   scales down while tasks wait or a job on the shared workers is active; once idle (no waiting
   task, no active job) for `cooldown_s` it goes down to `min_workers` (zero allowed). The time
   idleness began is an annotation on the Deployment itself, so a restarted scaler (a new pod)
   keeps the cooldown where the old one left it: nothing lives only in memory.
2. Per-job pools: a job whose spec has `resources` gets its own Deployment (the shared worker's
   pod template with the job's GPUs, memory, node selector and tolerations, consuming the job's
   own task queue). Every loop lists the pools by label and deletes those whose job ended or is
   gone from Redis: pools left behind by a restart of the scheduler or the scaler go too. Pods of
   a pool that failed or were evicted are written to the job's pool status record, which the
   scheduler's job view shows.

API errors: transient ones are retried in `KubeApi`; a 409 (the Deployment changed between our
read and our write) re-reads and decides again; a 403 is logged with what to grant and counted
(pwff_scaler_forbidden_total), and the loop goes on.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge

from services.scaler.kube import Forbidden, KubeApi, conflict, not_found
from services.scaler.status import LostPod, PoolStatus, write_pool_status
from shared.bus import Bus, Queues
from shared.settings import ScalerSettings
from shared.spec import JobSpec, ResourcesSpec
from shared.state import Repositories
from shared.store import Store

log = logging.getLogger(__name__)

IDLE_SINCE = "pwff.io/idle-since"
"""Annotation on the shared worker Deployment: Unix time the workers became idle (absent: busy)."""
POOL_LABEL = "pwff.io/pool"
JOB_LABEL = "pwff.io/job-hash"
JOB_ANNOTATION = "pwff.io/job-id"
INSTANCE_LABEL = "app.kubernetes.io/instance"
CONFLICT_RETRIES = 5

DESIRED = Gauge("pwff_scaler_desired_workers", "Replicas the scaler last set on the shared worker Deployment")
WAITING = Gauge("pwff_scaler_tasks_waiting", "Tasks waiting in the shared task queue at the last loop")
POOLS = Gauge("pwff_scaler_pools", "Per-job worker pools running")
FORBIDDEN = Counter(
    "pwff_scaler_forbidden_total", "Kubernetes API calls refused with 403 (the Role lacks a rule)", ["verb", "resource"]
)
CONFLICTS = Counter("pwff_scaler_conflicts_total", "Writes refused with 409 and decided again after a re-read")
LOOPS = Counter("pwff_scaler_loops_total", "Scaler loops, by outcome", ["outcome"])


@dataclass(frozen=True)
class Decision:
    replicas: int
    idle_since: float | None


def decide(
    current: int, waiting: int, consumers: int, active: bool, idle_since: float | None, now: float, s: ScalerSettings
) -> Decision:
    """The replicas of the shared workers, and when idleness began (None: not idle)."""
    low, high = s.min_workers, max(s.min_workers, s.max_workers)
    if waiting > 0:
        wanted = consumers + math.ceil(waiting / s.tasks_per_worker)
        return Decision(min(high, max(current, wanted, low)), None)
    kept = min(high, max(current, low))
    if active:  # tasks are in flight, or the next round's are about to be published
        return Decision(kept, None)
    if idle_since is None:
        return Decision(kept, now)
    if now - idle_since >= s.cooldown_s:
        return Decision(low, idle_since)
    return Decision(kept, idle_since)


def job_hash(job_id: str) -> str:
    """A label value for any job id (ids can exceed a label's 63 characters)."""
    return hashlib.sha256(job_id.encode()).hexdigest()[:16]


class Scaler:
    def __init__(
        self,
        kube: KubeApi,
        bus: Bus,
        store: Store,
        settings: ScalerSettings,
        namespace: str = "pwff",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.bus = bus
        self.state = Repositories(store, namespace)
        self.queues = Queues(namespace)
        self.settings = settings
        self.clock = clock
        self.last_loop_at: float | None = None  # when the last loop ended (self.clock), for /readyz
        self.last_outcome: str | None = None

    # -- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        log.info(
            "scaling %s/%s between %d and %d workers",
            self.kube.namespace,
            self.settings.worker_deployment,
            self.settings.min_workers,
            self.settings.max_workers,
        )
        while not stop.is_set():
            self.step()
            stop.wait(self.settings.interval_s)

    def step(self) -> None:
        """One loop; never raises for an API, broker or store failure (the next loop tries again)."""
        outcome = "ok"
        jobs = None
        try:
            jobs = self._jobs()
            self.scale_shared(jobs)
        except Exception as error:
            outcome = self._report(error, "scaling the shared workers")
        if self.settings.pools and jobs is not None:
            try:
                self.reconcile_pools(jobs)
            except Exception as error:
                outcome = self._report(error, "reconciling the per-job pools")
        LOOPS.labels(outcome).inc()
        self.last_loop_at, self.last_outcome = self.clock(), outcome

    def _report(self, error: Exception, what: str) -> str:
        if isinstance(error, Forbidden):
            FORBIDDEN.labels(error.verb, error.resource).inc()
            log.error(
                "%s: the API refused %s on %s (403). Grant it in the scaler's Role (the chart's rbac.yaml), "
                "or check the ServiceAccount the pod runs as.",
                what,
                error.verb,
                error.resource,
            )
            return "forbidden"
        log.error("%s failed; trying again next loop", what, exc_info=error)
        return "error"

    def _jobs(self) -> dict[str, JobSpec]:
        """Active (not final) jobs and their specs."""
        active: dict[str, JobSpec] = {}
        for job_id in self.state.jobs.ids():
            state = self.state.jobs.state(job_id)
            if state is None or state.final:
                continue
            try:
                active[job_id] = self.state.jobs.spec(job_id)
            except Exception:
                log.warning("job %s has no readable spec; ignoring it", job_id, exc_info=True)
        return active

    def _own_pool(self, spec: JobSpec) -> bool:
        return self.settings.pools and spec.resources is not None

    # -- the shared workers ---------------------------------------------------------------

    def scale_shared(self, jobs: dict[str, JobSpec]) -> Decision:
        name = self.settings.worker_deployment
        active = any(not self._own_pool(spec) for spec in jobs.values())
        for _ in range(CONFLICT_RETRIES):
            deployment = self.kube.get_deployment(name)
            current = int(deployment.spec.replicas or 0)
            annotations = dict(deployment.metadata.annotations or {})
            idle_since = _float(annotations.get(IDLE_SINCE))
            waiting = self.bus.depth(self.queues.tasks)
            consumers = self.bus.consumers(self.queues.tasks)
            decision = decide(current, waiting, consumers, active, idle_since, self.clock(), self.settings)
            WAITING.set(waiting)
            try:
                if decision.replicas != current:
                    # The read's resourceVersion makes the write conditional: someone else's change -> 409.
                    self.kube.scale_deployment(name, decision.replicas, deployment.metadata.resource_version)
                    log.info(
                        "%s: %d -> %d workers (%d waiting, %d consuming)",
                        name,
                        current,
                        decision.replicas,
                        waiting,
                        consumers,
                    )
                if decision.idle_since != idle_since:
                    value = None if decision.idle_since is None else f"{decision.idle_since:.3f}"
                    self.kube.patch_deployment(name, {"metadata": {"annotations": {IDLE_SINCE: value}}})
            except ApiException as error:
                if conflict(error):
                    CONFLICTS.inc()
                    log.info("%s changed while we scaled it (409); reading it again", name)
                    continue
                raise
            DESIRED.set(decision.replicas)
            return decision
        raise RuntimeError(f"{name}: still conflicting after {CONFLICT_RETRIES} re-reads")

    # -- per-job pools --------------------------------------------------------------------

    def pool_selector(self) -> str:
        return f"{POOL_LABEL}=true,{INSTANCE_LABEL}={self.settings.release}"

    def pool_name(self, job_id: str) -> str:
        return f"{self.settings.worker_deployment}-pool-{job_hash(job_id)}"

    def _mine(self, labels: dict[str, str] | None) -> bool:
        # The real API filters by the selector; checked again here so nothing else is ever deleted.
        labels = labels or {}
        return labels.get(POOL_LABEL) == "true" and labels.get(INSTANCE_LABEL) == self.settings.release

    def reconcile_pools(self, jobs: dict[str, JobSpec]) -> None:
        wanted = {job_id: spec for job_id, spec in jobs.items() if self._own_pool(spec)}
        existing = {}
        for deployment in self.kube.list_deployments(self.pool_selector()):
            if self._mine(deployment.metadata.labels):
                job_id = (deployment.metadata.annotations or {}).get(JOB_ANNOTATION, "")
                existing[job_id] = deployment
        pods = [pod for pod in self.kube.list_pods(self.pool_selector()) if self._mine(pod.metadata.labels)]
        now = self.clock()
        for job_id, deployment in existing.items():
            if job_id in wanted:
                continue
            try:
                self.kube.delete_deployment(deployment.metadata.name)
            except ApiException as error:
                if not not_found(error):
                    raise
            log.info("deleted pool %s: job %s ended", deployment.metadata.name, job_id or "(unknown)")
            if job_id:
                status = self._status(job_id, deployment.metadata.name, 0, pods, now)
                write_pool_status(
                    self.state.store, self.state.keys, job_id, status.model_copy(update={"deleted": True})
                )
        template: dict[str, Any] | None = None
        for job_id, spec in wanted.items():
            assert spec.resources is not None
            name = self.pool_name(job_id)
            queue = self.queues.job_tasks(job_id)
            waiting, consumers = self.bus.depth(queue), self.bus.consumers(queue)
            replicas = max(
                1, min(spec.resources.max_workers, consumers + math.ceil(waiting / self.settings.tasks_per_worker))
            )
            if job_id not in existing:
                if template is None:
                    template = self._worker_template()
                body = self.pool_deployment(job_id, spec.resources, template, replicas)
                try:
                    self.kube.create_deployment(body)
                    log.info("created pool %s for job %s (%d workers)", name, job_id, replicas)
                except ApiException as error:
                    if not conflict(error):  # 409: it exists already (a create that timed out did land)
                        raise
            else:
                deployment = existing[job_id]
                current = int(deployment.spec.replicas or 0)
                if replicas > current:  # pools only grow while their job runs; they go when it ends
                    try:
                        self.kube.scale_deployment(name, replicas, deployment.metadata.resource_version)
                    except ApiException as error:
                        if not conflict(error):
                            raise
                        CONFLICTS.inc()  # decided again next loop, from a fresh list
                else:
                    replicas = current
            write_pool_status(
                self.state.store, self.state.keys, job_id, self._status(job_id, name, replicas, pods, now)
            )
        POOLS.set(len(wanted))

    def _status(self, job_id: str, name: str, replicas: int, pods: list[Any], now: float) -> PoolStatus:
        mine = [pod for pod in pods if (pod.metadata.labels or {}).get(JOB_LABEL) == job_hash(job_id)]
        lost = [lost for pod in mine if (lost := _lost(pod)) is not None]
        ready = sum(1 for pod in mine if _ready(pod))
        return PoolStatus(deployment=name, replicas=replicas, ready=ready, lost_pods=lost, updated_at=now)

    def _worker_template(self) -> dict[str, Any]:
        """The shared worker Deployment's pod template, as plain JSON."""
        deployment = self.kube.get_deployment(self.settings.worker_deployment)
        api = self.kube.apps.api_client
        template: dict[str, Any] = api.sanitize_for_serialization(deployment.spec.template)
        return template

    def pool_deployment(
        self, job_id: str, resources: ResourcesSpec, template: dict[str, Any], replicas: int
    ) -> dict[str, Any]:
        """The pool's Deployment: the shared worker's pod template with the job's resources and queue."""
        s = self.settings
        selector = {POOL_LABEL: "true", INSTANCE_LABEL: s.release, JOB_LABEL: job_hash(job_id)}
        pod = copy.deepcopy(template)
        meta = pod.setdefault("metadata", {})
        labels = dict(meta.get("labels") or {})
        labels.update(selector)
        labels["app.kubernetes.io/component"] = "worker-pool"  # not selected by the shared worker Deployment
        meta["labels"] = labels
        meta.setdefault("annotations", {})[JOB_ANNOTATION] = job_id
        spec = pod.setdefault("spec", {})
        spec["nodeSelector"] = {**s.pool_node_selector, **(spec.get("nodeSelector") or {}), **resources.node_selector}
        tolerations = list(spec.get("tolerations") or []) + list(s.pool_tolerations)
        tolerations += [_toleration(t.model_dump()) for t in resources.tolerations]
        spec["tolerations"] = tolerations
        containers = spec.get("containers") or []
        if not containers:
            raise RuntimeError(f"{s.worker_deployment} has no container to copy")
        worker = containers[0]
        if s.pool_image:
            worker["image"] = s.pool_image
        env = [e for e in worker.get("env") or [] if e.get("name") != "PWFF_TASKS_QUEUE"]
        env.append({"name": "PWFF_TASKS_QUEUE", "value": self.queues.job_tasks(job_id)})
        worker["env"] = env
        limits = dict((worker.get("resources") or {}).get("limits") or {})
        requests = dict((worker.get("resources") or {}).get("requests") or {})
        if resources.gpus:
            limits[s.pool_gpu_resource] = str(resources.gpus)
            requests[s.pool_gpu_resource] = str(resources.gpus)
        if resources.memory:
            limits["memory"] = requests["memory"] = resources.memory
        if resources.cpu:
            requests["cpu"] = resources.cpu
        worker["resources"] = {k: v for k, v in (("limits", limits), ("requests", requests)) if v}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": self.pool_name(job_id),
                "namespace": self.kube.namespace,
                "labels": {**selector, "app.kubernetes.io/component": "worker-pool"},
                "annotations": {JOB_ANNOTATION: job_id},
            },
            "spec": {"replicas": replicas, "selector": {"matchLabels": selector}, "template": pod},
        }


class ScalerReadiness:
    """The scaler's /readyz: its loop ended recently (`loop`) and the last one did its work (`api`: no
    error, no 403). Read from what the loop records, so a probe makes no call of its own."""

    def __init__(self, scaler: Scaler, stale_after_s: float | None = None) -> None:
        self.scaler = scaler
        # Three loops, plus what one loop may spend in the API's retries and timeouts.
        self.stale_after_s = stale_after_s if stale_after_s is not None else 3 * scaler.settings.interval_s + 60

    def checks(self) -> dict[str, bool]:
        at = self.scaler.last_loop_at
        loop = at is not None and self.scaler.clock() - at <= self.stale_after_s
        return {"loop": loop, "api": self.scaler.last_outcome == "ok"}

    def close(self) -> None:
        pass


def _toleration(spec: dict[str, Any]) -> dict[str, Any]:
    out = {"key": spec["key"], "operator": spec["operator"], "value": spec["value"], "effect": spec["effect"]}
    out = {k: v for k, v in out.items() if v != "" or k == "operator"}
    if spec.get("toleration_seconds") is not None:
        out["tolerationSeconds"] = spec["toleration_seconds"]
    return out


def _lost(pod: Any) -> LostPod | None:
    status = pod.status
    if status is None:
        return None
    if status.phase == "Failed" or status.reason == "Evicted":
        return LostPod(name=pod.metadata.name, reason=status.reason or "Failed", message=status.message or "")
    for container in status.container_statuses or []:
        terminated = container.last_state.terminated if container.last_state else None
        if terminated is not None and terminated.reason in ("OOMKilled", "Error"):
            return LostPod(name=pod.metadata.name, reason=terminated.reason, message=terminated.message or "")
    return None


def _ready(pod: Any) -> bool:
    for condition in (pod.status.conditions if pod.status else None) or []:
        if condition.type == "Ready":
            return bool(condition.status == "True")
    return False


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
