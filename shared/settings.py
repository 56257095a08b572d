"""Process settings from the environment (PWFF_*), shared by every service."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pwff"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PWFF_", extra="ignore")

    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = Field("pwff", pattern=r"^[A-Za-z0-9_.-]+$", description="prefix of queues and keys")
    api_token: str = Field("", description="the API's one token (an admin tenant) when there is no tenants file")
    tenants_file: Path | None = Field(
        None, description="YAML of tenants, their tokens' SHA-256 and role (services.scheduler.tenants)"
    )
    submit_rate_per_minute: float = Field(30.0, gt=0, description="job submissions a tenant may make per minute")
    submit_burst: int = Field(10, ge=1, description="job submissions a tenant may make at once (token bucket size)")
    bus_secret: str = Field(
        "",
        description="deployment secret every service derives per-job bus message keys from (shared.signing); "
        "at least 16 bytes, the same in every service",
    )
    api_host: str = "0.0.0.0"
    api_port: int = 8080
    metrics_port: int = 0
    metrics_host: str = Field(
        "",
        description="address the /metrics, /healthz and /readyz port of the worker, aggregator and scaler listens on "
        "('': the API's, PWFF_API_HOST)",
    )
    metrics_job_linger_s: float = Field(
        120.0, ge=0, description="how long a finished job's per-job series stay exported, for a last scrape"
    )
    probe_stale_s: float = Field(
        15.0,
        gt=0,
        description="/readyz fails when the consume loop moved no data with the broker, or the store answered no "
        "PING, for this long",
    )
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    torch_threads: int = Field(
        0, ge=0, description="torch intra-op threads (0: the CPUs this process may use, see `available_cpus`)"
    )
    malloc_mmap_threshold: int = Field(
        1024 * 1024,
        ge=0,
        le=32 * 1024 * 1024,
        description="glibc serves blocks at least this large with mmap and unmaps them when freed (0: glibc default)",
    )
    log_level: str = "INFO"
    update_ttl_s: int = Field(7 * 24 * 3600, description="how long an uploaded update may wait in the store")
    job_retention_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        description="how long a job's keys (state, rounds, published models, clients' parts) stay in the store "
        "after it ends: succeeded, failed or cancelled (0: forever)",
    )
    max_message_bytes: int = 64 * 1024
    max_update_bytes: int = 512 * 1024 * 1024
    job_pools: bool = Field(
        False, description="scheduler: a job with `resources` gets its own task queue, which services.scaler serves"
    )
    tasks_queue: str = Field("", description="worker: the queue it consumes ('': the shared one; a per-job pool's)")
    clients_file: Path | None = Field(
        None,
        description="aggregator and scheduler: the enrolled bound clients' public keys and the revoked list (YAML, "
        "see shared.identity); re-read when it changes. Without it, bound clients' updates and evaluations are "
        "refused",
    )
    clients: str = Field(
        "", description="worker: comma-separated bound client identities it serves ('': a pool worker); --client"
    )
    client_data: str = Field("", description="worker: comma-separated data files, one per client in `clients`; --data")
    client_keys: str = Field(
        "", description="worker: comma-separated private key files, one per client in `clients`; --key"
    )
    dp_noise_key: SecretStr = Field(
        SecretStr(""),
        description="secret mixed into the seeds of differential-privacy noise (shared.privacy); without it the noise "
        "can be regenerated from the job seed, which suits experiments only",
    )
    scheduler_key: Path | None = Field(
        None,
        description="scheduler: its private key (PEM, `pwff client scheduler-key`), which signs every task it sends "
        "to a bound client. Without it, bound clients' workers refuse its tasks",
    )
    scheduler_public_key: str = Field(
        "",
        description="worker: the scheduler's public key (base64), handed to the client at enrollment; a bound "
        "worker runs only tasks it signed; --scheduler-key",
    )
    client_state_dir: Path | None = Field(
        None,
        description="worker: where bound clients' personal tensors and error-feedback residuals are kept between "
        "tasks and across restarts, on the client's own machine (None: <cache_dir>/client-state); --state-dir",
    )

    @property
    def probes_host(self) -> str:
        """Where the probes and /metrics listen: PWFF_METRICS_HOST, else PWFF_API_HOST."""
        return self.metrics_host or self.api_host


class ScalerSettings(BaseSettings):
    """services.scaler: sizes the worker Deployment (and per-job pools) through the Kubernetes API."""

    model_config = SettingsConfigDict(env_prefix="PWFF_SCALER_", extra="ignore")

    kube_namespace: str = Field("", description="namespace of the workers ('': the pod's own, else 'default')")
    worker_deployment: str = Field("pwff-worker", description="the shared worker Deployment it scales")
    release: str = Field("pwff", description="Helm release; labels the per-job pools it creates")
    min_workers: int = Field(0, ge=0, description="replicas once idle for cooldown_s (0 allowed)")
    max_workers: int = Field(8, ge=0, description="replicas it never scales above")
    tasks_per_worker: int = Field(1, ge=1, description="waiting tasks one more worker is started for")
    cooldown_s: float = Field(300.0, ge=0, description="idle time (no waiting task, no active job) before scaling down")
    interval_s: float = Field(10.0, gt=0, description="seconds between two loops")
    request_timeout_s: float = Field(10.0, gt=0, description="timeout of one Kubernetes API call")
    pools: bool = Field(True, description="run a job with a `resources` block on its own worker Deployment")
    pool_gpu_resource: str = Field("nvidia.com/gpu", description="extended resource a pool's GPU count requests")
    pool_image: str = Field("", description="image of the pools' workers ('': the shared worker's)")
    pool_node_selector: dict[str, str] = Field(default_factory=dict, description="pools' default node selector")
    pool_tolerations: list[dict[str, object]] = Field(default_factory=list, description="pools' default tolerations")
    metrics_port: int = Field(9103, ge=0, description="/metrics, /healthz, /readyz (0: none)")


_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")


def _cgroup_dirs(mount: Path, path: str) -> list[Path]:
    """The process's cgroup directory under `mount` and its ancestors up to the mount itself.

    Without a cgroup namespace the path may not exist under the mount (a container sees its own cgroup
    mounted as the root): then only the mount's own files count.
    """
    relative = Path(path.strip("/") or ".")
    dirs = []
    while True:
        candidate = mount / relative
        if candidate.is_dir():
            dirs.append(candidate)
        if relative == Path("."):
            break
        relative = relative.parent
    return dirs


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT, proc_cgroup: Path = _PROC_CGROUP) -> float | None:
    """CPUs the cgroup CPU quota allows (quota / period, as a container's CPU limit sets it), the tightest
    over the process's cgroup and its ancestors, cgroup v2 or v1; None when there is no quota."""
    lines = (_read(proc_cgroup) or "").splitlines()
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: "0::/path", cpu.max = "<quota|max> <period>"
            for directory in _cgroup_dirs(root, path):
                fields = (_read(directory / "cpu.max") or "").split()
                if len(fields) == 2 and fields[0] != "max":
                    try:
                        quota, period = int(fields[0]), int(fields[1])
                    except ValueError:
                        continue
                    if quota > 0 and period > 0:
                        limits.append(quota / period)
        elif "cpu" in controllers.split(","):  # cgroup v1: cpu.cfs_quota_us (-1: none) / cpu.cfs_period_us
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            mount = next((m for m in mounts if m.is_dir()), None)
            for directory in _cgroup_dirs(mount, path) if mount is not None else []:
                try:
                    quota = int(_read(directory / "cpu.cfs_quota_us") or "-1")
                    period = int(_read(directory / "cpu.cfs_period_us") or "0")
                except ValueError:
                    continue
                if quota > 0 and period > 0:
                    limits.append(quota / period)
    return min(limits) if limits else None


def available_cpus(root: Path = _CGROUP_ROOT, proc_cgroup: Path = _PROC_CGROUP) -> float:
    """The CPUs this process may actually use: its CPU affinity, capped by the cgroup CPU quota."""
    try:
        affinity = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        affinity = float(os.cpu_count() or 1)
    quota = cgroup_cpu_limit(root, proc_cgroup)
    return min(affinity, quota) if quota is not None else affinity


def torch_threads_for(requested: int, cpus: float) -> int:
    """Intra-op threads: `requested` (0: one per usable CPU, a fractional quota rounded down), never more
    threads than there are CPUs to run them (which only makes them wait on each other), at least one."""
    usable = max(1, math.floor(cpus + 1e-9))
    if requested <= 0:
        return usable
    ceiling = max(1, math.ceil(cpus - 1e-9))
    if requested > ceiling:
        logging.getLogger(__name__).warning(
            "PWFF_TORCH_THREADS=%d but only %.2f CPUs are available: using %d threads", requested, cpus, ceiling
        )
        return ceiling
    return requested


def configure_process(settings: Settings) -> None:
    """Settings every service applies once at start: logging, offline hub, allocator, torch threads."""
    import logging

    from shared.allocator import set_mmap_threshold

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("pika", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    set_mmap_threshold(settings.malloc_mmap_threshold)
    cpus = available_cpus()
    threads = torch_threads_for(settings.torch_threads or _omp_threads(), cpus)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
        logging.getLogger(__name__).info("torch uses %d intra-op threads (%.2f CPUs available)", threads, cpus)
    else:  # a process without tensors (the scheduler) need not import torch for this; whatever imports it later
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _omp_threads() -> int:
    """An explicit OMP_NUM_THREADS counts as a request, as it would for torch itself (0: none)."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0
