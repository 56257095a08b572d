"""services.scaler against an in-memory Kubernetes API (kmock's KubernetesEmulator, a real HTTP server
on 127.0.0.1 that the official `kubernetes` client talks to), with the in-process bus and store.

Checked: the calls it makes (scale up to the cap, down to min zero only after the cooldown, across a
restart of the scaler; per-job pools with the job's resources, deleted when the job ends or after a
restart) and its reactions to 409, 403, 5xx and timeouts; and that the chart's Role grants exactly
the (group, resource, verb) the emulator saw.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import pytest
import yaml
from prometheus_client import REGISTRY

from services.scaler.kube import CALLS, KubeApi, api_client
from services.scaler.scaler import IDLE_SINCE, JOB_ANNOTATION, Scaler, ScalerReadiness, decide, job_hash
from services.scaler.status import read_pool_status
from shared.bus import Queues
from shared.bus.memory import MemoryBus
from shared.health import ProbeServer
from shared.settings import ScalerSettings
from shared.spec import JobSpec
from shared.state import JobMeta, JobState, Repositories
from shared.store.memory import MemoryStore
from tests.test_helm import helm  # noqa: F401  (the fixture: helm from .tools/bin, PATH or installed)

NS = "ml"
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
PODS = kmock.resource("", "v1", "pods")
CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "pwff"


VERBS = {"FETCH": "get", "LIST": "list", "WATCH": "watch", "CREATE": "create", "DELETE": "delete"}


def _call(request: Any) -> tuple[str, str, str] | None:
    """(API group, resource[/subresource], verb) of a request, as RBAC names them."""
    if request.resource is None:
        return None
    verb = VERBS.get(request.action.name) or ("patch" if request.method.name == "PATCH" else "update")
    resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
    return (request.resource.group, resource, verb)


@dataclass
class Fault:
    """Answer the next `times` requests for `call` with `status` (after `delay_s`), changing nothing."""

    call: tuple[str, str, str]
    status: int
    times: int = 1_000_000
    delay_s: float = 0.0


@attrs.define(kw_only=True)
class FaultyEmulator(kmock.KubernetesEmulator):
    """kmock's emulator, plus faults that refuse a request before it touches the stored objects (kmock's
    own reactions answer after the emulator applied the write, unlike a real API server refusing it)."""

    faults: list[Fault] = attrs.field(factory=list)
    seen: list[tuple[str, str, str]] = attrs.field(factory=list)

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        call = _call(request)
        if call is not None:
            self.seen.append(call)
            for fault in self.faults:
                if fault.call == call and fault.times > 0:
                    fault.times -= 1
                    await asyncio.sleep(fault.delay_s)
                    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": fault.status}
                    return aiohttp.web.json_response(body, status=fault.status)
        return await super()._handle(request)


class Emulator:
    """The emulator served on its own event loop and thread, for the synchronous `kubernetes` client."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "kmock did not start"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with FaultyEmulator() as api, kmock.Server(api) as server:
            self.api = api
            self.url = str(server.url).rstrip("/")
            # Declared so that listing them answers an empty list, not 404, before any object exists.
            api.resources[DEPLOYMENTS] = kmock.ResourceInfo()
            api.resources[PODS] = kmock.ResourceInfo()
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def fail(self, call: tuple[str, str, str], status: int, times: int = 1_000_000, delay_s: float = 0.0) -> None:
        self.api.faults.append(Fault(call, status, times, delay_s))

    def deployment(self, name: str) -> dict[str, Any]:
        return dict(self.api.objects[DEPLOYMENTS, NS, name].raw)

    def exists(self, name: str) -> bool:
        key = (DEPLOYMENTS, NS, name)
        return key in self.api.objects and not self.api.objects[key].deleted

    def calls(self) -> set[tuple[str, str, str]]:
        return set(self.api.seen)

    def count(self, resource: str, verb: str) -> int:
        return sum(1 for call in self.api.seen if call[1:] == (resource, verb))

    def last(self, resource: str, verb: str) -> Any:
        return [r for r in self.api if _call(r) is not None and _call(r)[1:] == (resource, verb)][-1]  # type: ignore[index]


GET = ("apps", "deployments", "get")
SCALE = ("apps", "deployments/scale", "patch")
CREATE = ("apps", "deployments", "create")


WORKER = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "pwff-worker", "namespace": NS, "resourceVersion": "1", "labels": {"app": "w"}},
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/component": "worker"}},
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/component": "worker", "app.kubernetes.io/instance": "rel"}},
            "spec": {
                "serviceAccountName": "pwff",
                "containers": [
                    {
                        "name": "worker",
                        "image": "pwff:cpu",
                        "env": [{"name": "PWFF_NAMESPACE", "value": "t"}],
                        "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}},
                    }
                ],
            },
        },
    },
    "status": {"replicas": 1},
}


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emulator = Emulator()
    emulator.api.objects[DEPLOYMENTS, NS, "pwff-worker"] = WORKER
    yield emulator
    emulator.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, emulator: Emulator, **settings: Any) -> None:
        self.emulator = emulator
        self.settings = ScalerSettings(
            worker_deployment="pwff-worker",
            release="rel",
            min_workers=0,
            max_workers=4,
            cooldown_s=60,
            **settings,
        )
        self.bus = MemoryBus()
        self.store = MemoryStore()
        self.repos = Repositories(self.store, "t")
        self.queues = Queues("t")
        self.clock = Clock()
        self.scaler = self.restart()

    def restart(self) -> Scaler:
        """A new scaler process: nothing kept from the old one but what is in the API and the store."""
        kube = KubeApi(api_client(self.emulator.url), NS, timeout_s=0.5, attempts=4, backoff_s=0.01)
        self.scaler = Scaler(kube, self.bus, self.store, self.settings, namespace="t", clock=self.clock)
        return self.scaler

    def tasks(self, n: int, queue: str | None = None) -> None:
        for i in range(n):
            self.bus.publish(queue or self.queues.tasks, f"task {i}".encode())

    def drain(self, queue: str | None = None) -> None:
        self.bus.purge(queue or self.queues.tasks)

    def job(self, job_id: str, state: JobState = JobState.RUNNING, **spec: Any) -> None:
        meta = JobMeta(id=job_id, spec=JobSpec.model_validate(spec), state=state, created_at=1.0, updated_at=1.0)
        self.repos.jobs.create(meta)

    def end(self, job_id: str) -> None:
        self.repos.jobs.update(job_id, state=JobState.SUCCEEDED)

    def replicas(self, name: str = "pwff-worker") -> int:
        return int(self.emulator.deployment(name)["spec"]["replicas"])


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# -- the decision, alone ----------------------------------------------------------------------


def test_decide_hysteresis() -> None:
    s = ScalerSettings(min_workers=0, max_workers=5, tasks_per_worker=2, cooldown_s=30)
    assert decide(0, 3, 0, False, None, 100, s).replicas == 2  # ceil(3 / 2)
    assert decide(1, 20, 1, True, None, 100, s).replicas == 5  # capped
    assert decide(4, 0, 4, True, 50, 100, s) == decide(4, 0, 4, True, None, 100, s)  # busy: no idleness
    assert decide(4, 0, 0, False, None, 100, s).idle_since == 100  # idleness starts
    assert decide(4, 0, 0, False, 100, 129, s).replicas == 4  # not before the cooldown
    assert decide(4, 0, 0, False, 100, 130, s).replicas == 0  # then to min (zero)
    assert decide(2, 0, 0, False, None, 100, ScalerSettings(min_workers=3, max_workers=5)).replicas == 3


# -- the shared Deployment --------------------------------------------------------------------


def test_scales_up_to_the_cap_and_down_after_the_cooldown_across_a_restart(emulator: Emulator) -> None:
    rig = Rig(emulator)
    rig.job("j1")
    rig.tasks(3)
    rig.scaler.step()
    assert rig.replicas() == 3
    rig.tasks(10)
    rig.scaler.step()
    assert rig.replicas() == 4  # max_workers
    # Scale writes are conditional on the resourceVersion read just before.
    assert emulator.last("deployments/scale", "patch").data["metadata"]["resourceVersion"] == "1"

    rig.drain()
    rig.end("j1")
    rig.scaler.step()  # idle from now on: the time goes on the Deployment, replicas stay
    assert rig.replicas() == 4
    assert float(emulator.deployment("pwff-worker")["metadata"]["annotations"][IDLE_SINCE]) == rig.clock.now

    rig.clock.now += 59
    rig.restart().step()  # a new scaler process, 59 s later: the cooldown is not over
    assert rig.replicas() == 4
    rig.clock.now += 1
    rig.restart().step()
    assert rig.replicas() == 0  # min_workers, zero allowed

    rig.tasks(1)  # work again: up from zero, idleness forgotten
    rig.scaler.step()
    assert rig.replicas() == 1
    assert emulator.deployment("pwff-worker")["metadata"]["annotations"].get(IDLE_SINCE) is None


def test_no_scale_down_while_a_job_is_active(emulator: Emulator) -> None:
    rig = Rig(emulator)
    rig.job("j1")
    rig.tasks(2)
    rig.scaler.step()
    rig.drain()  # tasks taken by the workers: none waiting, but the round runs
    rig.clock.now += 3600
    rig.scaler.step()
    assert rig.replicas() == 2
    assert emulator.count("deployments", "patch") == 0  # never marked idle


def test_conflict_is_read_again_and_decided_again(emulator: Emulator) -> None:
    rig = Rig(emulator)
    rig.tasks(2)
    before = _metric("pwff_scaler_conflicts_total")
    emulator.fail(SCALE, 409, times=1)
    rig.scaler.step()
    assert _metric("pwff_scaler_conflicts_total") == before + 1
    assert emulator.count("deployments/scale", "patch") == 2
    assert emulator.count("deployments", "get") == 2  # read again after the 409
    assert rig.replicas() == 2


def test_server_errors_and_timeouts_are_retried(emulator: Emulator) -> None:
    rig = Rig(emulator)
    rig.tasks(3)
    emulator.fail(GET, 503, times=2)
    emulator.fail(SCALE, 200, times=1, delay_s=2.0)  # answers after the client's 0.5 s timeout
    labels = {"verb": "patch", "resource": "deployments/scale", "reason": "timeout"}
    before = _metric("pwff_scaler_api_errors_total", labels)
    rig.scaler.step()
    assert emulator.count("deployments", "get") == 3  # 503, 503, then the deployment
    assert emulator.count("deployments/scale", "patch") == 2  # timed out, then done
    assert _metric("pwff_scaler_api_errors_total", labels) == before + 1
    assert rig.replicas() == 3


def test_persistent_server_errors_give_up_without_crashing(emulator: Emulator) -> None:
    rig = Rig(emulator)
    emulator.fail(GET, 500)
    before = _metric("pwff_scaler_loops_total", {"outcome": "error"})
    rig.scaler.step()
    assert emulator.count("deployments", "get") == 4  # attempts=4, then the loop gives up until next time
    assert _metric("pwff_scaler_loops_total", {"outcome": "error"}) == before + 1
    assert rig.replicas() == 1


def test_forbidden_is_reported_not_retried(emulator: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(emulator)
    rig.tasks(2)
    emulator.fail(SCALE, 403)
    labels = {"verb": "patch", "resource": "deployments/scale"}
    before = _metric("pwff_scaler_forbidden_total", labels)
    rig.scaler.step()
    rig.scaler.step()  # the loop goes on
    assert emulator.count("deployments/scale", "patch") == 2  # once per loop: a 403 is not retried
    assert _metric("pwff_scaler_forbidden_total", labels) == before + 2
    assert "refused patch on deployments/scale (403)" in caplog.text
    assert rig.replicas() == 1


# -- per-job pools ----------------------------------------------------------------------------

GPU_JOB: dict[str, Any] = {
    "resources": {
        "gpus": 2,
        "memory": "24Gi",
        "node_selector": {"gpu.example/class": "h200"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "max_workers": 3,
    }
}


def test_pool_created_with_the_jobs_resources_and_deleted_when_it_ends(emulator: Emulator) -> None:
    rig = Rig(emulator, pool_node_selector={"pool": "yes"})
    rig.job("gpu-job-1", **GPU_JOB)
    rig.tasks(5, rig.queues.job_tasks("gpu-job-1"))
    rig.scaler.step()
    name = rig.scaler.pool_name("gpu-job-1")
    pool = emulator.deployment(name)
    labels = pool["metadata"]["labels"]
    assert labels["pwff.io/pool"] == "true" and labels["app.kubernetes.io/instance"] == "rel"
    assert labels["pwff.io/job-hash"] == job_hash("gpu-job-1")
    assert pool["metadata"]["annotations"][JOB_ANNOTATION] == "gpu-job-1"
    assert pool["spec"]["replicas"] == 3  # 5 waiting, capped at the job's max_workers
    assert pool["spec"]["selector"]["matchLabels"]["pwff.io/job-hash"] == job_hash("gpu-job-1")
    pod = pool["spec"]["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "worker-pool"
    assert pod["spec"]["nodeSelector"] == {"pool": "yes", "gpu.example/class": "h200"}
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    worker = pod["spec"]["containers"][0]
    assert worker["resources"]["limits"] == {"cpu": "1", "nvidia.com/gpu": "2", "memory": "24Gi"}
    assert {"name": "PWFF_TASKS_QUEUE", "value": "t.tasks.gpu-job-1"} in worker["env"]
    assert rig.replicas() == 1  # the shared workers are not scaled for a job on its own pool
    assert (read_pool_status(rig.store, rig.repos.keys, "gpu-job-1") or {})["replicas"] == 3

    rig.scaler.step()  # nothing to change: no second create
    assert emulator.count("deployments", "create") == 1
    rig.end("gpu-job-1")
    rig.scaler.step()
    assert not emulator.exists(name)
    assert (read_pool_status(rig.store, rig.repos.keys, "gpu-job-1") or {})["deleted"] is True


def test_pools_left_behind_are_deleted_after_a_restart(emulator: Emulator) -> None:
    rig = Rig(emulator)
    rig.job("a", **GPU_JOB)
    rig.job("b", **GPU_JOB)
    rig.scaler.step()
    assert emulator.exists(rig.scaler.pool_name("a")) and emulator.exists(rig.scaler.pool_name("b"))
    # While the scaler is down, job a ends and job b's record goes (purged); an unrelated deployment stays.
    emulator.api.objects[DEPLOYMENTS, NS, "other"] = {**WORKER, "metadata": {"name": "other", "namespace": NS}}
    rig.end("a")
    rig.store.delete(rig.repos.keys.job("b"))
    rig.store.delete(rig.repos.keys.jobs)
    rig.job("c", state=JobState.CANCELLED, **GPU_JOB)  # ended before any pool: none is created
    rig.restart().step()
    assert not emulator.exists(rig.scaler.pool_name("a"))
    assert not emulator.exists(rig.scaler.pool_name("b"))
    assert not emulator.exists(rig.scaler.pool_name("c"))
    assert emulator.exists("other") and emulator.exists("pwff-worker")


def test_create_conflict_means_it_exists(emulator: Emulator) -> None:
    rig = Rig(emulator)
    rig.job("a", **GPU_JOB)
    emulator.fail(CREATE, 409, times=1)
    before = _metric("pwff_scaler_loops_total", {"outcome": "ok"})
    rig.scaler.step()
    assert _metric("pwff_scaler_loops_total", {"outcome": "ok"}) == before + 1


def test_lost_pods_show_in_the_pool_status(emulator: Emulator) -> None:
    rig = Rig(emulator)
    rig.job("a", **GPU_JOB)
    labels = {"pwff.io/pool": "true", "app.kubernetes.io/instance": "rel", "pwff.io/job-hash": job_hash("a")}

    def pod(name: str, status: dict[str, Any]) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": NS, "labels": labels}, "status": status}

    api = emulator.api
    api.objects[PODS, NS, "p1"] = pod("p1", {"phase": "Failed", "reason": "Evicted", "message": "low on memory"})
    api.objects[PODS, NS, "p2"] = pod("p2", {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]})
    api.objects[PODS, NS, "p3"] = pod(
        "p3",
        {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "worker",
                    "image": "x",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 1,
                    "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                }
            ],
        },
    )
    rig.scaler.step()
    status = read_pool_status(rig.store, rig.repos.keys, "a")
    assert status is not None
    assert status["ready"] == 1
    assert [(p["name"], p["reason"]) for p in status["lost_pods"]] == [("p1", "Evicted"), ("p3", "OOMKilled")]


# -- RBAC -------------------------------------------------------------------------------------


def _rendered_role(helm_bin: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [helm_bin, "template", "rel", str(CHART), "--namespace", NS, "--show-only", "templates/rbac.yaml", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    (role,) = [d for d in docs if d["kind"] == "Role"]
    return role


def _granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_role_grants_exactly_the_calls_made(emulator: Emulator, helm: str) -> None:  # noqa: F811
    rig = Rig(emulator)
    rig.job("a", **GPU_JOB)
    rig.tasks(2)
    rig.scaler.step()  # scale up, create a pool, list pods
    rig.drain()
    rig.end("a")
    rig.scaler.step()  # mark idle (patch), delete the pool
    rig.clock.now += 3600
    rig.scaler.step()
    made = emulator.calls()
    assert made == CALLS  # every call KubeApi can make was exercised here
    assert _granted(_rendered_role(helm)) == made


def test_role_without_pools_drops_pool_verbs(helm: str) -> None:  # noqa: F811
    granted = _granted(_rendered_role(helm, "--set", "scaler.pools.enabled=false"))
    assert granted == {c for c in CALLS if c[2] in ("get", "patch")}


# -- the scheduler's side: routing to the pool's queue, and the job view -----------------------


@pytest.mark.parametrize("job_pools", [True, False])
def test_scheduler_routes_a_pool_jobs_tasks_and_shows_its_pool(
    emulator: Emulator, tiny_spec: Any, job_pools: bool
) -> None:
    from services.scheduler.core import Scheduler
    from services.scheduler.views import JobView
    from shared.messages import JobInitialized, encode

    rig = Rig(emulator, pools=job_pools)  # the chart sets both from scaler.pools.enabled
    scheduler = Scheduler(rig.bus, rig.store, namespace="t", job_pools=job_pools)
    job_id = scheduler.submit(tiny_spec(resources={"gpus": 1, "max_workers": 2}))
    shared_id = scheduler.submit(tiny_spec())
    for job in (job_id, shared_id):
        scheduler.handle_event(encode(JobInitialized(job_id=job, metrics={})))
    own, shared = rig.bus.depth(rig.queues.job_tasks(job_id)), rig.bus.depth(rig.queues.tasks)
    # With pools (the chart sets PWFF_JOB_POOLS when the scaler runs them) the job's round goes to its
    # own queue; without, every task stays on the shared queue, so no job waits for a pool that never comes.
    assert (own, shared) == ((3, 3) if job_pools else (0, 6))

    rig.scaler.step()
    view = JobView.model_validate(scheduler.get_job(job_id))
    assert scheduler.get_job(shared_id)["pool"] is None
    if not job_pools:
        assert view.pool is None and not emulator.exists(rig.scaler.pool_name(job_id))
        assert rig.replicas() == 4  # the shared workers take all 6 tasks, up to max_workers
        return
    assert view.pool is not None and view.pool.deployment == rig.scaler.pool_name(job_id)
    assert view.pool.replicas == 2  # 3 waiting, capped at the job's max_workers
    assert rig.replicas() == 3  # the shared job's 3 tasks


# -- what the scaler reads from the bus -------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "rabbitmq"])
def test_bus_depth_and_consumers(kind: str) -> None:
    """The scaler's inputs on both buses; RabbitMQ's from a passive declare (the real broker on 127.0.0.1)."""
    import uuid

    from shared.bus.rabbitmq import RabbitBus

    queue = f"scaler-test-{uuid.uuid4().hex[:8]}.tasks"
    bus = MemoryBus() if kind == "memory" else RabbitBus("amqp://guest:guest@127.0.0.1:5672/%2F")
    try:
        for i in range(3):
            bus.publish(queue, f"task {i}".encode())
        assert (bus.depth(queue), bus.consumers(queue)) == (3, 0)
        taken = threading.Event()
        release = threading.Event()
        stop = threading.Event()

        def handler(body: bytes) -> None:
            taken.set()
            release.wait(10)

        consumer = threading.Thread(target=bus.consume, args=(queue, handler, stop), daemon=True)
        consumer.start()
        assert taken.wait(10)
        deadline = time.monotonic() + 10
        while (bus.depth(queue), bus.consumers(queue)) != (2, 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (bus.depth(queue), bus.consumers(queue)) == (2, 1)  # one in flight is not waiting
        stop.set()
        release.set()
        consumer.join(10)
        deadline = time.monotonic() + 10
        while bus.consumers(queue) != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bus.consumers(queue) == 0
    finally:
        if isinstance(bus, RabbitBus):
            bus.delete_queues(queue)
        bus.close()


def test_probes_answer_from_the_loops_record(emulator: Emulator) -> None:
    rig = Rig(emulator)
    server = ProbeServer(0, ScalerReadiness(rig.scaler), host="127.0.0.1")
    try:

        def readyz() -> tuple[int, dict[str, Any]]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/readyz", timeout=5) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        assert readyz() == (503, {"ready": False, "loop": False, "api": False})  # no loop yet
        rig.scaler.step()
        assert readyz() == (200, {"ready": True, "loop": True, "api": True})
        rig.clock.now += 3 * rig.settings.interval_s + 61  # the loop stopped ending: stale
        assert readyz()[1] == {"ready": False, "loop": False, "api": True}
        emulator.fail(GET, 403)
        rig.scaler.step()
        assert readyz() == (503, {"ready": False, "loop": True, "api": False})  # it runs but cannot scale
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
            assert response.status == 200  # liveness: the process answers; a refused API is no reason to restart
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            assert b"pwff_scaler_loops_total" in response.read()
    finally:
        server.close()


def test_chart_probes_the_scaler(helm: str) -> None:  # noqa: F811
    out = subprocess.run(
        [helm, "template", "rel", str(CHART), "--namespace", NS, "--show-only", "templates/scaler-deployment.yaml"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    [deployment] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
