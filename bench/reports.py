"""The JSON report every comparison benchmark writes: its summary line, the full results, the job
specs that produced them and the machine they ran on (timings mean little without it)."""

from __future__ import annotations

import argparse
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


def add_overrides_option(parser: argparse.ArgumentParser) -> None:
    """`--set key=value` (repeatable, dotted keys) into `args.overrides`: spec overrides for every job the
    benchmark runs, applied after its own settings (the tests run the benchmarks on the tiny models so)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of every job's spec (dotted keys; repeatable), e.g. --set model=tiny-bert",
    )
