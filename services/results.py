"""The results folder of a job: PEFT folders, metrics.json and a plot, as `pwff run` and `pwff download` write them."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from shared.models import extract_archive

log = logging.getLogger(__name__)

# matplotlib is an optional extra: the services never plot, only `pwff run` / `pwff download` do.
PLOTS_MISSING = "metrics.png skipped: matplotlib is not installed (pip install 'pwff[plots]')"


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
    if _have_matplotlib():
        plot_metrics(job, out_dir / "metrics.png")
    else:
        (out_dir / "metrics.png").unlink(missing_ok=True)  # an older run's figure would not match metrics.json
        log.warning(PLOTS_MISSING)
    return out_dir


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        if error.name != "matplotlib":
            raise  # installed but broken: say so, don't pretend it is absent
        return False
    return True


def _replace(folder: Path, archive: bytes) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    extract_archive(archive, folder)


def plot_metrics(job: dict[str, Any], path: Path) -> None:
    """Accuracy, loss and traffic per round; with personalization, every client's global vs personalized
    accuracy; the simulated delay and energy of each round; for `fwd`, perturbations and variance; with
    `privacy`, epsilon spent per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = job["metrics"]
    rounds = [m["round"] for m in metrics]
    evaluated = [m for m in metrics if m.get("per_client")]
    costed = [m for m in metrics if "delay_s" in m]
    forward = [m for m in metrics if "perturbations" in m]
    private = [m for m in metrics if "dp_epsilon" in m]
    extra = sum(1 for panel in (evaluated, costed, forward, private) if panel)
    rows = 1 + -(-extra // 3)
    figure, axes = plt.subplots(rows, 3, figsize=(14, 4 * rows), squeeze=False)
    acc_ax, loss_ax, bytes_ax = axes[0]
    acc_ax.plot(rounds, [m["accuracy"] for m in metrics], marker="o")
    acc_ax.set(title="held-out accuracy (global model)", xlabel="round", ylabel="accuracy")
    loss_ax.plot(rounds, [m["loss"] for m in metrics], marker="o", label="held-out")
    trained = [(m["round"], m["train_loss"]) for m in metrics if "train_loss" in m]
    if trained:
        loss_ax.plot(*zip(*trained, strict=True), marker="x", label="training (clients)")
    loss_ax.set(title="loss", xlabel="round")
    loss_ax.legend()
    bytes_ax.bar(rounds, [m.get("bytes_up", 0) / 1e6 for m in metrics], label="up")
    bytes_ax.plot(rounds, [m.get("bytes_down", 0) / 1e6 for m in metrics], "k.-", label="down")
    bytes_ax.set(title="traffic per round", xlabel="round", ylabel="MB")
    bytes_ax.legend()
    free = iter([axis for row in axes[1:] for axis in row])
    if evaluated:
        _plot_per_client(next(free), evaluated)
    if costed:
        _plot_device_costs(next(free), costed)
    if forward:
        _plot_forward(next(free), forward)
    if private:
        _plot_privacy(next(free), private, job["spec"].get("privacy") or {})
    for unused in free:
        unused.set_visible(False)
    figure.suptitle(f"{job['id']}: {job['spec']['model']} on {job['spec']['dataset']} ({job['state']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_per_client(axis: Any, evaluated: list[dict[str, Any]]) -> None:
    rounds = [m["round"] for m in evaluated]
    # Align jobs report rewards, every other job accuracy.
    figure = "weighted_reward" if "client_mean_personalized_weighted_reward" in evaluated[-1] else "accuracy"
    # Keys are ints in process and strings after a JSON round trip through the API.
    clients = sorted({str(c) for m in evaluated for c in m["per_client"]}, key=int)
    for client in clients:
        points = [(m["round"], entry) for m in evaluated if (entry := _client_entry(m, client)) is not None]
        xs = [r for r, _ in points]
        axis.plot(xs, [e.get(f"personalized_{figure}") for _, e in points], color="tab:orange", alpha=0.25)
        axis.plot(xs, [e.get(f"global_{figure}") for _, e in points], color="tab:blue", alpha=0.25)
    means = [
        ("personalized", "o-", "tab:orange"),
        ("global", "o--", "tab:blue"),
        ("reference", ":", "tab:gray"),
    ]
    for model, style, color in means:
        key = f"client_mean_{model}_{figure}"
        if all(key in m for m in evaluated):
            axis.plot(rounds, [m[key] for m in evaluated], style, color=color, label=f"{model} (mean)")
    label = "weighted reward" if figure == "weighted_reward" else "accuracy"
    axis.set(title=f"each client's held-out {label} (thin: one client)", xlabel="round", ylabel=label)
    axis.legend(fontsize=8)


def _client_entry(metrics: dict[str, Any], client: str) -> dict[str, Any] | None:
    per_client = metrics["per_client"]
    entry = per_client.get(client, per_client.get(int(client)))
    return entry if isinstance(entry, dict) else None


def _plot_device_costs(axis: Any, costed: list[dict[str, Any]]) -> None:
    rounds = [m["round"] for m in costed]
    axis.plot(rounds, [m["delay_s"] for m in costed], "o-", color="tab:red", label="delay (slowest device)")
    axis.set(title="simulated wireless round cost", xlabel="round", ylabel="delay (s)")
    energy = axis.twinx()
    energy.plot(rounds, [m.get("energy_j", 0.0) for m in costed], "s--", color="tab:green", label="energy (all)")
    energy.set_ylabel("energy (J)")
    lines = axis.get_legend_handles_labels()[0] + energy.get_legend_handles_labels()[0]
    axis.legend(lines, [line.get_label() for line in lines], fontsize=8)


def _plot_forward(axis: Any, forward: list[dict[str, Any]]) -> None:
    rounds = [m["round"] for m in forward]
    axis.bar(rounds, [m["perturbations"] for m in forward], color="tab:purple", alpha=0.6)
    axis.set(title="FwdLLM: perturbations and variance per step", xlabel="round", ylabel="perturbations")
    variance = axis.twinx()
    variance.plot(rounds, [m["variance"] for m in forward], "k.-")
    variance.set_ylabel("normalized variance")


def _plot_privacy(axis: Any, private: list[dict[str, Any]], privacy: dict[str, Any]) -> None:
    rounds = [m["round"] for m in private]
    # An epsilon that is not finite (no noise) comes back from the API as null: nothing to draw.
    epsilons = [m["dp_epsilon"] if isinstance(m["dp_epsilon"], (int, float)) else float("nan") for m in private]
    axis.plot(rounds, epsilons, "o-", color="tab:brown")
    axis.set(
        title=f"privacy spent (z={privacy.get('noise_multiplier')}, C={privacy.get('clip_norm')})",
        xlabel="round",
        ylabel=f"epsilon at delta={privacy.get('delta')}",
    )
