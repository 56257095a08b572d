"""The results folder of a job: PEFT folders, metrics.json and a plot, as `pwff run` and `pwff download` write them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from shared.models import extract_archive


def write_results(
    out_dir: Path,
    job: dict[str, Any],
    global_archive: bytes | None,
    client_archive: Callable[[int], bytes | None],
    clients: Iterable[int],
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if global_archive is not None:
        _replace(out_dir / "global", global_archive)
    for client in clients:
        blob = client_archive(client)
        if blob is not None:
            _replace(out_dir / "clients" / str(client), blob)
    (out_dir / "metrics.json").write_text(json.dumps(job, indent=2, sort_keys=True))
    plot_metrics(job, out_dir / "metrics.png")
    return out_dir


def _replace(folder: Path, archive: bytes) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    extract_archive(archive, folder)


def plot_metrics(job: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [m["round"] for m in job["metrics"]]
    figure, (acc_ax, loss_ax, bytes_ax) = plt.subplots(1, 3, figsize=(14, 4))
    acc_ax.plot(rounds, [m["accuracy"] for m in job["metrics"]], marker="o")
    acc_ax.set(title="held-out accuracy (global model)", xlabel="round", ylabel="accuracy")
    loss_ax.plot(rounds, [m["loss"] for m in job["metrics"]], marker="o", label="held-out")
    trained = [(m["round"], m["train_loss"]) for m in job["metrics"] if "train_loss" in m]
    if trained:
        loss_ax.plot(*zip(*trained, strict=True), marker="x", label="training (clients)")
    loss_ax.set(title="loss", xlabel="round")
    loss_ax.legend()
    bytes_ax.bar(rounds, [m.get("bytes_up", 0) / 1e6 for m in job["metrics"]], label="up")
    bytes_ax.plot(rounds, [m.get("bytes_down", 0) / 1e6 for m in job["metrics"]], "k.-", label="down")
    bytes_ax.set(title="traffic per round", xlabel="round", ylabel="MB")
    bytes_ax.legend()
    figure.suptitle(f"{job['id']}: {job['spec']['model']} on {job['spec']['dataset']} ({job['state']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
