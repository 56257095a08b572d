"""`pwff run` end to end through the real typer app, in a throwaway working folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from services.cli import app
from tests.conftest import TINY

# The tiny-bert job of the embedded tests, cut to one round on two clients: seconds, not minutes.
SPEC = {
    **TINY,
    "name": "cli",
    "num_clients": 2,
    "clients_per_round": 2,
    "rounds": 1,
    "local_steps": 1,
    "max_length": 16,
    "eval_max_examples": 16,
}


@pytest.fixture
def workdir(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder holding only the spec; the model cache the other tests share."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    monkeypatch.chdir(folder)
    monkeypatch.setenv("PWFF_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps long lines at the terminal width
    return folder


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["run", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.output


def _created(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def test_run_writes_runs_job_id_by_default(workdir: Path) -> None:
    code, stdout, output = _run("spec.yaml")
    assert code == 0, output
    job_id = stdout.strip().splitlines()[-1]
    run_dir = workdir / "runs" / job_id
    assert (run_dir / "global" / "adapter_config.json").is_file()
    assert (run_dir / "global" / "adapter_model.safetensors").is_file()
    assert (run_dir / "metrics.json").is_file()
    assert (run_dir / "metrics.png").is_file()
    assert sorted(p.name for p in (run_dir / "clients").iterdir()) == ["0", "1"]
    # Nothing but runs/<job-id>/ (and the spec that was there) in the working folder.
    assert {p.name for p in workdir.iterdir()} == {"spec.yaml", "runs"}
    assert [p.name for p in (workdir / "runs").iterdir()] == [job_id]
    assert f"results in runs/{job_id}" in output


def test_run_out_writes_there_instead(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "results"
    code, _, output = _run("spec.yaml", "--out", str(out))
    assert code == 0, output
    assert (out / "global" / "adapter_config.json").is_file()
    assert (out / "metrics.json").is_file()
    assert (out / "metrics.png").is_file()
    assert _created(workdir) == {"spec.yaml"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["spec.yaml", "--set", "rounds=0"], "rounds"),
        (["spec.yaml", "--set", "no_such_field=1"], "no_such_field"),
        (["missing.yaml"], "cannot read spec missing.yaml"),
    ],
)
def test_run_rejects_an_invalid_spec_with_exit_2(workdir: Path, args: list[str], message: str) -> None:
    code, _, output = _run(*args)
    assert code == 2
    assert "invalid spec:" in output
    assert message in output
    assert _created(workdir) == {"spec.yaml"}


# -- the HTTP commands, against the API over an in-process scheduler (its round loop not running) --

TOKEN = "cli-test-token"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`pwff submit/status/wait/download/jobs/cancel` talk to an in-process API instead of a URL."""
    from fastapi.testclient import TestClient

    from services import cli
    from services.client import Client
    from services.scheduler.api import create_app
    from services.scheduler.core import Scheduler
    from shared.bus.memory import MemoryBus
    from shared.store.memory import MemoryStore

    app_ = create_app(Scheduler(MemoryBus(), MemoryStore()), TOKEN)

    def client(api: str, token: str) -> Client:
        assert token == TOKEN
        return Client(token=token, http=TestClient(app_))

    monkeypatch.setattr(cli, "Client", client)
    monkeypatch.setenv("PWFF_API_TOKEN", TOKEN)
    monkeypatch.setenv("COLUMNS", "200")
    yield


def _pwff(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.output


def test_http_commands_as_the_readme_shows_them(api: None, workdir: Path) -> None:
    code, stdout, output = _pwff("submit", "spec.yaml", "--set", "rounds=3")
    assert code == 0, output
    job_id = stdout.strip()
    assert job_id.startswith("cli-")
    code, stdout, _ = _pwff("jobs")
    assert code == 0 and job_id in stdout and "queued" in stdout
    code, stdout, _ = _pwff("status", job_id)
    assert code == 0 and "queued (round 0/3)" in stdout
    code, _, output = _pwff("cancel", job_id)
    assert code == 0 and f"job {job_id} cancelled" in output
    code, _, output = _pwff("cancel", job_id)
    assert code == 1 and "409" in output
    code, _, output = _pwff("wait", job_id)  # non-zero unless the job succeeded
    assert code == 1 and "cancelled" in output
    # A job that published nothing still downloads its metrics; one client's model is a 404.
    code, _, output = _pwff("download", job_id, "-o", "out")
    assert code == 0, output
    assert json.loads((workdir / "out" / "metrics.json").read_text())["state"] == "cancelled"
    assert not (workdir / "out" / "global").exists()
    code, _, output = _pwff("download", job_id, "--client", "0", "-o", "c0")
    assert code == 1 and "404" in output
    code, _, output = _pwff("download", job_id)  # -o is required: no default folder
    assert code == 2 and "--out" in output


def test_http_commands_need_a_token_and_a_reachable_api(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PWFF_API_TOKEN", raising=False)
    code, _, output = _pwff("jobs", "--api", "http://127.0.0.1:9")
    assert code == 2 and "no API token" in output
    code, _, output = _pwff("jobs", "--api", "http://127.0.0.1:9", "--token", "t")
    assert code == 3 and "cannot reach the API" in output


# -- --version, validate, plain errors, logs under the progress bar ---------------------------------


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    code, stdout, _ = _pwff("--version")
    assert code == 0 and stdout.strip() == f"pwff {version('pwff')}"


def test_validate_checks_a_spec_without_submitting_it(workdir: Path) -> None:
    code, stdout, output = _pwff("validate", "spec.yaml", "--set", "rounds=3")
    assert code == 0, output
    assert stdout.strip() == (
        "valid: cli: tiny-bert on bbc-news, mode backprop, 2 clients (2 a round, dirichlet partition), 3 rounds"
    )
    assert _created(workdir) == {"spec.yaml"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "roundz=3"], "invalid spec: roundz: unknown field (did you mean 'rounds'?)"),
        (["--set", "lora.alpah=4"], "invalid spec: lora.alpah: unknown field (did you mean 'alpha'?)"),
        (["--set", "clients_per_round=5"], "invalid spec: clients_per_round (5) exceeds num_clients (2)"),
        (["--set", "model=./no-such-model"], "invalid spec: model: model './no-such-model': no such folder"),
    ],
)
def test_validate_says_what_is_wrong_in_plain_words(workdir: Path, args: list[str], message: str) -> None:
    code, _, output = _pwff("validate", "spec.yaml", *args)
    assert code == 2
    assert output.strip() == message  # one line, no "Value error," and no pydantic link
    assert "Value error" not in output


def test_validate_reads_a_local_data_source(workdir: Path) -> None:
    rows = [{"text": f"note {i}", "label": ["good", "bad"][i % 2]} for i in range(40)]
    (workdir / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = ["--set", "dataset.path=notes.jsonl", "--set", "dataset.label_field=label"]
    code, stdout, output = _pwff("validate", "spec.yaml", *local)
    assert code == 0, output
    assert "on notes.jsonl (classification, classes ['bad', 'good'])" in stdout
    code, _, output = _pwff("validate", "spec.yaml", *local, "--set", "dataset.labels=[good, maybe]")
    assert code == 2
    assert "label 'bad' is not one of the classes ['good', 'maybe']" in output


def test_log_lines_go_through_the_progress_bars_console(capsys: pytest.CaptureFixture[str]) -> None:
    """While a bar is live the root logger's stream handlers give way to a RichHandler on its console."""
    import logging

    from rich.logging import RichHandler

    from services import cli

    root = logging.getLogger()
    plain = logging.StreamHandler()
    root.addHandler(plain)
    try:
        with cli._progress() as progress:
            progress.add_task("job", total=2, status="")
            assert plain not in root.handlers
            live = [h for h in root.handlers if isinstance(h, RichHandler)]
            assert len(live) == 1 and live[0].console is cli.console
            logging.getLogger("pwff.test").warning("a log line under the bar")
        assert plain in root.handlers and not any(isinstance(h, RichHandler) for h in root.handlers)
    finally:
        root.removeHandler(plain)
    assert "a log line under the bar" in capsys.readouterr().err
