"""What a worker of one kind needs, measured alone: one local task in a fresh child process.

A benchmark that reports a worker's peak memory runs the task in a child of its own (`run_measured`),
so no other job, model or allocator state of the benchmark's process counts, and reads the child's
whole-process peak RSS from `wait4`. The child itself calls `one_task`, which does what a worker does
for a task: the cached model, the job's initial trainable state, the mode's `run_local` on the
client's shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.spec import JobSpec

REPO = Path(__file__).resolve().parents[1]


def run_measured(script: Path, args: list[str], mark: str) -> tuple[dict[str, Any], float]:
    """Run `python script *args`; return (the JSON it printed after `mark`, its peak RSS in MB)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            [sys.executable, str(script), *args], stdout=out, stderr=err, text=True, env=env, cwd=REPO
        )
        # wait4 gives this child's own rusage: ru_maxrss is its whole-process peak RSS (kB on Linux).
        _, status, usage = os.wait4(process.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [line for line in stdout.splitlines() if line.startswith(mark)]
    if code != 0 or not lines:
        sys.stderr.write(stderr[-5000:])
        raise RuntimeError(f"{script.name} {args[0] if args else ''}: child exited with {code}")
    return json.loads(lines[-1][len(mark) :]), usage.ru_maxrss / 1024


def one_task(spec: JobSpec, job_id: str, client: int = 0, local_steps: int | None = None) -> dict[str, Any]:
    """`client`'s round-1 task of `spec` on the job's initial state, in this process: its time and upload size.

    The process is set up as a service's (`configure_process`: allocator, threads), then BENCH_THREADS
    (default 2) sets torch's threads. `local_steps` overrides the mode's full budget.
    """
    import torch

    from shared import data
    from shared.adapters import ModelCache
    from shared.messages import TrainTask
    from shared.models import initial_state, load_trainable_state
    from shared.modes import mode_of
    from shared.modes.base import LocalContext
    from shared.seeding import derive_seed
    from shared.settings import Settings, configure_process

    settings = Settings()
    configure_process(settings)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, tokenizer = ModelCache(settings.cache_dir).get(spec)
    state = initial_state(model, derive_seed("init", spec.seed))
    load_trainable_state(model, state)
    mode = mode_of(spec)
    fields = mode.task_fields(spec, mode.full_budget(spec))
    if local_steps is not None:
        fields["local_steps"] = local_steps
    task = TrainTask(job_id=job_id, round=1, client=client, **fields)
    began = time.perf_counter()
    result = mode.run_local(
        LocalContext(
            spec=spec,
            task=task,
            model=model,
            tokenizer=tokenizer,
            examples=data.client_examples(spec, client),
            start_state=state,
            personal={},
            artifact=lambda name, round_: None,
        )
    )
    return {"task_s": time.perf_counter() - began, "upload_bytes": len(result.payload)}
