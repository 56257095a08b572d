"""Torch threads follow the CPUs a process may use (affinity, cgroup v1/v2 CPU quota), not the machine's cores;
the Helm chart gives workers a CPU limit equal to their request, from which their threads follow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from shared.settings import Settings, available_cpus, cgroup_cpu_limit, configure_process, torch_threads_for

REPO = Path(__file__).resolve().parents[1]


def _v2(tmp_path: Path, path: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A fake cgroup v2 tree: `limits` maps a directory (relative to the root) to its cpu.max."""
    root = tmp_path / "cgroup"
    (root / path.strip("/")).mkdir(parents=True, exist_ok=True)
    for directory, value in limits.items():
        (root / directory).mkdir(parents=True, exist_ok=True)
        (root / directory / "cpu.max").write_text(value + "\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"0::{path}\n")
    return root, proc


def _v1(tmp_path: Path, path: str, quota: int, period: int = 100_000, mount: str = "cpu,cpuacct") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    directory = root / mount / path.strip("/")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (directory / "cpu.cfs_period_us").write_text(f"{period}\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"12:memory:{path}\n4:{mount}:{path}\n1:name=systemd:{path}\n")
    return root, proc


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, "/kubepods/pod1/worker", {"kubepods/pod1/worker": "150000 100000"})
    assert cgroup_cpu_limit(root, proc) == 1.5


def test_cgroup_v2_tightest_ancestor_wins(tmp_path: Path) -> None:
    root, proc = _v2(
        tmp_path, "/a/b/c", {"a": "100000 100000", "a/b": "400000 100000", "a/b/c": "max 100000", ".": "max 100000"}
    )
    assert cgroup_cpu_limit(root, proc) == 1.0


def test_cgroup_v2_without_quota(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, "/", {".": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None


def test_cgroup_v2_namespaced_container_sees_its_own_root(tmp_path: Path) -> None:
    # With a cgroup namespace the container's cgroup is "/" and its limit sits at the mount's root.
    root, proc = _v2(tmp_path, "/", {".": "200000 100000"})
    assert cgroup_cpu_limit(root, proc) == 2.0


def test_cgroup_v2_path_outside_the_mount_falls_back_to_the_root(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, "/", {".": "50000 100000"})
    proc.write_text("0::/host/path/the/container/cannot/see\n")
    assert cgroup_cpu_limit(root, proc) == 0.5


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_cgroup_v1_quota(tmp_path: Path, mount: str) -> None:
    root, proc = _v1(tmp_path, "/docker/abc", quota=250_000, mount=mount)
    assert cgroup_cpu_limit(root, proc) == 2.5


def test_cgroup_v1_unlimited(tmp_path: Path) -> None:
    root, proc = _v1(tmp_path, "/", quota=-1)
    assert cgroup_cpu_limit(root, proc) is None


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "nothing", tmp_path / "no-proc-file") is None


def test_available_cpus_is_affinity_capped_by_the_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    root, proc = _v2(tmp_path, "/", {".": "max 100000"})
    assert available_cpus(root, proc) == affinity
    root, proc = _v2(tmp_path / "q", "/", {".": "50000 100000"})
    assert available_cpus(root, proc) == min(affinity, 0.5)


@pytest.mark.parametrize(
    ("requested", "cpus", "threads"),
    [(0, 2.0, 2), (0, 1.5, 1), (0, 0.5, 1), (0, 16.0, 16), (1, 2.0, 1), (3, 4.0, 3), (8, 2.0, 2), (4, 2.5, 3)],
)
def test_thread_count(requested: int, cpus: float, threads: int) -> None:
    assert torch_threads_for(requested, cpus) == threads


def test_configure_process_sizes_torch_threads_from_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        monkeypatch.setattr("shared.settings.available_cpus", lambda: 1.0)
        configure_process(Settings(torch_threads=0))
        assert torch.get_num_threads() == 1
        monkeypatch.setattr("shared.settings.available_cpus", lambda: 2.0)
        configure_process(Settings(torch_threads=0))
        assert torch.get_num_threads() == 2
        configure_process(Settings(torch_threads=5))  # more than there are CPUs: capped
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an explicit OMP_NUM_THREADS is a request too
        configure_process(Settings(torch_threads=0))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_worker_process_pinned_to_one_cpu_uses_one_thread() -> None:
    """What a worker does at start (configure_process), in a process whose affinity is one CPU."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); os.environ.pop('OMP_NUM_THREADS', None)\n"
        "import torch\n"
        "from shared.settings import Settings, configure_process\n"
        "configure_process(Settings(torch_threads=0)); print(torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PWFF_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "1"


def _helm() -> str:
    local = REPO / ".tools" / "bin" / "helm"
    found = str(local) if local.is_file() else shutil.which("helm")
    assert found, "helm is needed to render the chart (see tests/test_helm.py for how CI installs it)"
    return found


def test_chart_gives_workers_a_cpu_limit_their_threads_follow() -> None:
    rendered = subprocess.run(
        [_helm(), "template", "pwff", str(REPO / "deploy" / "helm" / "pwff"), "--set", "secrets.apiToken=t"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-worker"))
    container = worker["spec"]["template"]["spec"]["containers"][0]
    resources = container["resources"]
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PWFF_TORCH_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu"
