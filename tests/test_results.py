"""The run folder's figure: what a user reads first after `pwff run`."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from services.results import PLOTS_MISSING, plot_metrics, write_results

REPO = Path(__file__).resolve().parents[1]


def _job(rounds: int, personalized: bool, costed: bool, forward: bool) -> dict[str, Any]:
    metrics: list[dict[str, Any]] = []
    for r in range(rounds + 1):
        entry: dict[str, Any] = {"round": r, "accuracy": 0.3 + 0.1 * r, "loss": 1.5 - 0.1 * r, "bytes_up": 1e5 * r}
        if r and costed:
            entry |= {"delay_s": 2.0 + r, "energy_j": 100.0 * r}
        if r and forward:
            entry |= {"perturbations": 256 * r, "variance": 0.9 / r, "cosine": 0.05}
        if r and personalized:
            per_client = {c: {"global_accuracy": 0.5, "personalized_accuracy": 0.6 + 0.05 * c} for c in range(3)}
            entry |= {
                "per_client": per_client,
                "client_mean_global_accuracy": 0.5,
                "client_mean_personalized_accuracy": 0.65,
            }
        metrics.append(entry)
    return {
        "id": "job-1",
        "state": "succeeded",
        "spec": {"model": "minilm-l6", "dataset": "bbc-news"},
        "metrics": metrics,
    }


def _image_shape(path: Path) -> tuple[int, int]:
    image = pytest.importorskip("matplotlib.image")
    return tuple(image.imread(path).shape[:2])


def test_plain_job_gets_one_row_of_panels(tmp_path: Path) -> None:
    plot_metrics(_job(3, personalized=False, costed=False, forward=False), tmp_path / "m.png")
    assert _image_shape(tmp_path / "m.png") == (400, 1400)


def test_personalized_costed_forward_job_adds_a_row_and_survives_json(tmp_path: Path) -> None:
    # Through the API per-client keys become strings; the figure reads either.
    job = json.loads(json.dumps(_job(3, personalized=True, costed=True, forward=True)))
    plot_metrics(job, tmp_path / "m.png")
    assert _image_shape(tmp_path / "m.png") == (800, 1400)
    in_process = _job(2, personalized=True, costed=True, forward=False)
    plot_metrics(in_process, tmp_path / "n.png")
    assert _image_shape(tmp_path / "n.png") == (800, 1400)


def _peft_archive(tag: str) -> bytes:
    """A tar.gz shaped like a published adapter; write_results only unpacks it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, payload in (("adapter_config.json", b"{}"), ("adapter_model.safetensors", tag.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _write(out: Path, job: dict[str, Any]) -> None:
    write_results(out, job, _peft_archive("global"), lambda c: _peft_archive(f"client {c}"), range(2))


def test_write_results_without_matplotlib_skips_only_the_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    job = _job(2, personalized=True, costed=True, forward=False)
    (tmp_path / "metrics.png").write_bytes(b"an older run's figure")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails as if not installed
    with caplog.at_level(logging.INFO, logger="services.results"):
        _write(tmp_path, job)
    assert (tmp_path / "global" / "adapter_config.json").is_file()
    assert (tmp_path / "global" / "adapter_model.safetensors").read_bytes() == b"global"
    assert (tmp_path / "clients" / "1" / "adapter_model.safetensors").read_bytes() == b"client 1"
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(job))
    assert not (tmp_path / "metrics.png").exists()
    assert [r.getMessage() for r in caplog.records] == [PLOTS_MISSING]
    assert "pip install 'pwff[plots]'" in PLOTS_MISSING


def test_write_results_with_matplotlib_draws_the_plot(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    with caplog.at_level(logging.INFO, logger="services.results"):
        _write(tmp_path, _job(2, personalized=False, costed=False, forward=False))
    assert _image_shape(tmp_path / "metrics.png") == (400, 1400)
    assert (tmp_path / "clients" / "0" / "adapter_config.json").is_file()
    assert not caplog.records


ENTRY_POINTS = (
    "services.scheduler.__main__",
    "services.worker.__main__",
    "services.aggregator.__main__",
    "services.embedded",
    "services.cli",
    "services.results",
)


def test_no_service_needs_matplotlib_to_start() -> None:
    # matplotlib is the optional `plots` extra: every entry point must import without it.
    probe = "import sys\nsys.modules['matplotlib'] = None\n" + "".join(f"import {m}\n" for m in ENTRY_POINTS)
    subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, timeout=300)
