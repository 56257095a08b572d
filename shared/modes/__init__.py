"""Training modes: one module each, behind the interface in `shared.modes.base`.

The registry that maps a spec's `mode` to its class is `shared.registry.MODES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.registry import MODES

if TYPE_CHECKING:
    from shared.modes.base import TrainingMode
    from shared.spec import JobSpec


def mode_of(spec: JobSpec) -> TrainingMode:
    return MODES[spec.mode]


__all__ = ["MODES", "mode_of"]
