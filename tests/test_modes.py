"""Training modes are plugins: the registry drives the spec, and a new mode runs end to end unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from services.embedded import EmbeddedCluster
from shared.codec import decode_tensors
from shared.modes import mode_of
from shared.modes.backprop import BackpropMode
from shared.modes.fwd import ForwardMode
from shared.registry import MODES, PRESETS, STRATEGIES, Registry
from shared.spec import JobSpec, SpecError, parse_spec
from shared.state import Repositories


def test_spec_allows_exactly_the_registered_names() -> None:
    schema = JobSpec.model_json_schema()
    properties = schema["properties"]
    assert properties["mode"]["enum"] == list(MODES)
    defs = schema["$defs"]
    assert defs["PersonalizationSpec"]["properties"]["preset"]["enum"] == list(PRESETS)
    assert defs["AggregationSpec"]["properties"]["strategy"]["enum"] == list(STRATEGIES)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mode", "rl", "unknown training mode 'rl'; known: backprop, fwd"),
        ("personalization", {"preset": "x"}, "unknown personalization preset 'x'"),
        ("aggregation", {"strategy": "bulyan"}, "unknown aggregation strategy 'bulyan'; known: fedavg"),
        ("model", "gpt-9", "unknown model 'gpt-9'"),
    ],
)
def test_unknown_plugin_names_are_clear_spec_errors(field: str, value: object, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({field: value})


def test_registry_instantiates_each_plugin_once_and_names_the_known_ones() -> None:
    assert isinstance(MODES["backprop"], BackpropMode) and MODES["backprop"] is MODES["backprop"]
    assert isinstance(mode_of(JobSpec(mode="fwd")), ForwardMode)
    with pytest.raises(KeyError, match="known: backprop, fwd"):
        MODES["nope"]
    empty: Registry[object] = Registry("thing", {})
    assert list(empty) == [] and len(empty) == 0


@pytest.fixture
def head_sgd_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The one line a new mode adds to shared/registry.py."""
    monkeypatch.setitem(MODES._entries, "head-sgd", "tests.plugins.head_sgd:HeadSGDMode")
    yield


@pytest.mark.usefixtures("head_sgd_registered")
def test_a_new_mode_runs_end_to_end_through_unchanged_services(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path
) -> None:
    spec = tiny_spec(mode="head-sgd", rounds=2, local_steps=2)
    with EmbeddedCluster(cache_dir, workers=1) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id)
        state = Repositories(cluster.store)
        before = decode_tensors(state.tensors.global_state(job_id, 1) or b"")  # round 0 is pruned by now
        after = decode_tensors(state.tensors.global_state(job_id, 2) or b"")
    assert job["state"] == "succeeded", job["error"]
    assert [m["head_updates"] for m in job["metrics"][1:]] == [3.0, 3.0]  # the mode's own figure
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all("modules_to_save" in name for name in moved), moved  # only the head trained
