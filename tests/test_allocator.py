"""The glibc mmap threshold every service sets: freed activations leave the process."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from shared.allocator import set_mmap_threshold
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# A fresh process: 48 blocks of 4 MB, each followed by a small block that pins the heap above
# it (as the many small tensors of a training step do), then the large blocks are freed.
_PROBE = """
import json, sys, torch
from shared.allocator import set_mmap_threshold
applied = set_mmap_threshold(int(sys.argv[1]))
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
warm = torch.ones(4 << 20); del warm  # freeing this 16 MB block raises glibc's dynamic threshold to 16 MB
big, small = [], []
for _ in range(48):
    big.append(torch.ones(1 << 20))
    small.append(torch.ones(16))
held = rss_mb()
del big
print(json.dumps({"applied": applied, "released_mb": held - rss_mb()}))
"""


def _released(threshold: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(threshold)], cwd=REPO, capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@glibc_only
def test_freed_large_blocks_go_back_to_the_os_with_the_threshold() -> None:
    tuned = _released(1024 * 1024)
    default = _released(0)
    assert tuned["applied"] and not default["applied"]
    # Without the threshold what comes back depends on what the imports happened to free
    # (0 to 160 MB here); with it, every freed 4 MB block is unmapped.
    assert tuned["released_mb"] > 0.9 * 192, (tuned, default)


def test_threshold_bounds() -> None:
    assert set_mmap_threshold(0) is False
    with pytest.raises(ValueError, match="maximum"):
        set_mmap_threshold(64 * 1024 * 1024)
    with pytest.raises(ValueError):
        Settings(malloc_mmap_threshold=-1)
    assert Settings().malloc_mmap_threshold == 1024 * 1024
