"""The typed state layer over both store twins: what the services read is what they wrote."""

from __future__ import annotations

import pytest

from shared.spec import JobSpec
from shared.state import JobMeta, JobState, Repositories, RoundCommit, RoundPlan, RoundRecord, RoundStatus
from shared.store import Store


@pytest.fixture
def state(store: Store, key_namespace: str) -> Repositories:
    return Repositories(store, key_namespace.rstrip(":"), update_ttl_s=60)


def _meta(job_id: str = "job-abc") -> JobMeta:
    spec = JobSpec(name="state-test", model="tiny-bert", rounds=3)
    return JobMeta(id=job_id, spec=spec, created_at=100.5, updated_at=100.5, init_sent_at=100.5)


def test_job_record_round_trips_with_its_types(state: Repositories) -> None:
    state.jobs.create(_meta())
    got = state.jobs.require("job-abc")
    assert got == _meta() and got.state is JobState.QUEUED and got.spec.rounds == 3
    assert state.jobs.ids() == {"job-abc"} and state.jobs.spec("job-abc") == _meta().spec
    state.jobs.update("job-abc", state=JobState.RUNNING, round=2, updated_at=101.25, error="note")
    got = state.jobs.require("job-abc")
    assert (got.state, got.round, got.updated_at, got.error, got.created_at) == (
        JobState.RUNNING,
        2,
        101.25,
        "note",
        100.5,
    )
    assert state.jobs.state("job-abc") is JobState.RUNNING and state.jobs.current_round("job-abc") == 2


def test_missing_job_reads_as_absent(state: Repositories) -> None:
    assert state.jobs.get("nope") is None and state.jobs.state("nope") is None
    assert state.jobs.current_round("nope") == 0
    with pytest.raises(KeyError):
        state.jobs.require("nope")
    with pytest.raises(KeyError):
        state.jobs.spec("nope")


def test_unknown_fields_are_refused_before_anything_is_written(state: Repositories) -> None:
    state.jobs.create(_meta())
    with pytest.raises(ValueError, match="no fields"):
        state.jobs.update("job-abc", stat="running")
    with pytest.raises(ValueError, match="no fields"):
        state.jobs.update_plan("job-abc", 1, statuz=RoundStatus.OPEN)
    assert state.jobs.require("job-abc") == _meta()


def test_round_plan_partial_updates_keep_the_other_fields(state: Repositories) -> None:
    plan = RoundPlan(clients=[3, 1, 2], opened_at=10.0, deadline_at=910.0, expected=3)
    state.jobs.save_plan("job-abc", 1, plan)
    state.jobs.update_plan("job-abc", 1, status=RoundStatus.CLOSING, close_sent_at=11.5, force=True)
    got = state.jobs.plan("job-abc", 1)
    assert got == plan.model_copy(update={"status": RoundStatus.CLOSING, "close_sent_at": 11.5, "force": True})
    assert state.jobs.planned_clients("job-abc", 1) == [3, 1, 2]
    assert state.jobs.plan("job-abc", 2) is None and state.jobs.planned_clients("job-abc", 2) is None


def test_client_figures_count_each_client_once(state: Repositories) -> None:
    figures = {"global_accuracy": 0.5, "personalized_accuracy": 0.75}
    assert state.jobs.add_client_figures("job-abc", 3, 10, figures) == 1
    assert state.jobs.add_client_figures("job-abc", 3, 2, figures) == 2
    assert state.jobs.add_client_figures("job-abc", 3, 2, figures) == 2  # a redelivered evaluation
    assert list(state.jobs.client_figures("job-abc", 3)) == [2, 10]


def test_merged_set_is_typed_and_sorted(state: Repositories) -> None:
    for client, wave in [(5, 1), (5, 0), (2, 0)]:
        state.rounds.add_merged("job-abc", 1, client, wave)
    state.rounds.add_merged("job-abc", 1, 5, 0)
    assert state.rounds.merged("job-abc", 1) == [(2, 0), (5, 0), (5, 1)]


def test_commit_makes_everything_visible_and_prunes_two_rounds_back(state: Repositories) -> None:
    tensors, rounds = state.tensors, state.rounds
    for round_ in (1, 2, 3):
        key = tensors.update_key("job-abc", round_, 4, 0, 0)
        tensors.put_update(key, b"update")
        tensors.put_announcement("job-abc", round_, 4, 0, b"announce")
        record = RoundRecord(round=round_, clients=[4], metrics={"accuracy": round_ / 10}, extra={"devices": {}})
        commit = RoundCommit(
            record=record,
            state=f"state-{round_}".encode(),
            artifacts={"gradient": f"g-{round_}".encode()},
            archive=f"archive-{round_}".encode(),
            merged=[(4, 0)],
            prune=("gradient",),
        )
        assert not rounds.is_committed("job-abc", round_)
        rounds.commit("job-abc", commit)
        assert rounds.committed("job-abc", round_) == record
        assert tensors.update(key) is None and tensors.announcement("job-abc", round_, 4, 0) is None
    assert [r.round for r in rounds.history("job-abc")] == [1, 2, 3]
    assert tensors.archive("job-abc", "global") == b"archive-3"
    assert tensors.global_state("job-abc", 1) is None and tensors.artifact("job-abc", "gradient", 1) is None
    assert tensors.global_state("job-abc", 2) == b"state-2" and tensors.artifact("job-abc", "gradient", 3) == b"g-3"


def test_personal_versions_order_by_round_then_wave(state: Repositories) -> None:
    """Wave 10,000 of round 1 comes before wave 0 of round 2 (they collided as round*10000+wave)."""
    tensors = state.tensors
    assert tensors.latest_personal("job-abc", 7, before=(9, 0)) is None
    tensors.put_personal("job-abc", 7, (1, 10_000), b"late wave of round 1")
    tensors.put_personal("job-abc", 7, (2, 0), b"round 2")
    assert tensors.latest_personal("job-abc", 7, before=(2, 0)) == ((1, 10_000), b"late wave of round 1")
    assert tensors.latest_personal("job-abc", 7, before=(2, 1)) == ((2, 0), b"round 2")
    assert tensors.latest_personal("job-abc", 7, before=(1, 10_000)) is None
