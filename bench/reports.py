"""The JSON report every comparison benchmark writes: its summary line, the full results, the job
specs that produced them and the machine they ran on (timings mean little without it)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch


def write_report(path: Path, summary: dict[str, Any], results: dict[str, Any], specs: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "summary": summary,
        "results": results,
        "specs": specs,
        "machine": {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    path.write_text(json.dumps(report, indent=2, default=str))
