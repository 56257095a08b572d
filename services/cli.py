"""`pwff`: run a job embedded, or drive a deployment over its HTTP API."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.client import ApiError, Client, PwffError
from shared.rewards import TRAIN_EVAL_EXAMPLES as REWARD_EVAL_EXAMPLES
from shared.rewards import TRAIN_STEPS as REWARD_TRAIN_STEPS
from shared.spec import SpecError, load_spec_file
from shared.state import JobState

app = typer.Typer(help="Personalized federated fine-tuning of language models.", no_args_is_help=True)
console = Console(stderr=True)

SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a spec field: key=value (dotted keys)")]
ApiOption = Annotated[str, typer.Option("--api", envvar="PWFF_API_URL", help="scheduler URL")]
TokenOption = Annotated[str, typer.Option("--token", envvar="PWFF_API_TOKEN", help="API bearer token")]


def _version() -> str:
    try:
        return package_version("pwff")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        print(f"pwff {_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print pwff's version and exit"),
    ] = False,
) -> None:
    """Personalized federated fine-tuning of language models."""


def _spec_or_exit(path: Path, overrides: list[str] | None) -> Any:
    try:
        return load_spec_file(str(path), overrides or [])
    except SpecError as error:
        console.print(f"[red]invalid spec:[/red] {error}", highlight=False)
        raise typer.Exit(2) from None


@contextmanager
def _progress() -> Iterator[Progress]:
    """A live progress bar on stderr; while it shows, log records go through rich's console too.

    A plain StreamHandler writes to the stderr it captured at start, under the bar: each log line
    would leave a torn copy of the bar behind. A RichHandler on the bar's console prints above it.
    """
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )
    root = logging.getLogger()
    plain = [h for h in root.handlers if type(h) is logging.StreamHandler]
    rich = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    rich.setLevel(min((h.level for h in plain), default=logging.NOTSET))
    for handler in plain:
        root.removeHandler(handler)
    root.addHandler(rich)
    try:
        with progress:
            yield progress
    finally:
        root.removeHandler(rich)
        for handler in plain:
            root.addHandler(handler)


def _round_status(job: dict[str, Any]) -> str:
    if not job["metrics"]:
        return job["state"]
    last = job["metrics"][-1]
    text = f"round {last['round']}: acc {last['accuracy']:.3f} loss {last['loss']:.3f}"
    if "bytes_up" in last:
        text += f" up {last['bytes_up'] / 1e3:.1f} kB"
    return text


class _RoundBar:
    """One progress bar over rounds, refreshed from the job view."""

    def __init__(self, progress: Progress, job_id: str, rounds: int) -> None:
        self.progress = progress
        self.task = progress.add_task(job_id, total=rounds, status="starting")

    def __call__(self, job: dict[str, Any]) -> None:
        committed = max((m["round"] for m in job["metrics"]), default=0)
        self.progress.update(self.task, completed=committed, status=_round_status(job))


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="job spec (YAML)")],
    set_: SetOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="results folder (default: runs/<job-id> in the working folder)")
    ] = None,
    workers: Annotated[int, typer.Option(help="worker threads in this process")] = 1,
) -> None:
    """Run a job embedded: scheduler, aggregator and workers in this process."""
    spec = _spec_or_exit(spec_path, set_)
    if spec.clients.kind == "bound":
        # Its clients' data lives with their own workers: nothing in this process may train them.
        console.print(
            "[red]a job with bound clients runs on a deployment:[/red] pwff submit it, and start each client's "
            "worker with pwff worker --client ID --data FILE --key KEY"
        )
        raise typer.Exit(2)
    from services.embedded import EmbeddedCluster
    from services.results import write_results
    from shared.settings import Settings, configure_process

    settings = Settings()
    configure_process(settings)
    started = time.perf_counter()
    with EmbeddedCluster(settings.cache_dir, workers=workers) as cluster, _progress() as progress:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id, _RoundBar(progress, job_id, spec.rounds))
        target = out if out is not None else Path("runs") / job_id
        write_results(
            target,
            job,
            cluster.scheduler.model_archive(job_id),
            lambda client: cluster.scheduler.model_archive(job_id, client),
            range(spec.num_clients),
        )
    _summary(job, time.perf_counter() - started)
    console.print(f"results in [bold]{target}[/bold]")
    print(job_id)
    if job["state"] != JobState.SUCCEEDED:
        raise typer.Exit(1)


def _summary(job: dict[str, Any], elapsed: float | None = None) -> None:
    state = job["state"]
    colour = "green" if state == JobState.SUCCEEDED else "red"
    line = f"job {job['id']} [{colour}]{state}[/{colour}]"
    if job["metrics"]:
        best = max(m["accuracy"] for m in job["metrics"])
        line += f": final accuracy {job['metrics'][-1]['accuracy']:.4f} (best {best:.4f})"
    if elapsed is not None:
        line += f" in {elapsed:.0f}s"
    console.print(line)
    if job.get("error"):
        console.print(f"[red]{job['error']}[/red]")


# -- the HTTP commands: services.client ----------------------------------------------------


@contextmanager
def _client(api: str, token: str) -> Iterator[Client]:
    """The API's Python client; its errors become one line on stderr and an exit code (1: refused, 3: unreachable)."""
    if not token:
        console.print("[red]no API token:[/red] pass --token or set PWFF_API_TOKEN")
        raise typer.Exit(2)
    try:
        with Client(api, token) as client:
            yield client
    except ApiError as error:
        console.print(f"[red]{error.status_code}:[/red] {error.message}", highlight=False)
        raise typer.Exit(1) from None
    except PwffError as error:
        console.print(f"[red]{error}[/red]", highlight=False)
        raise typer.Exit(3) from None


@app.command()
def validate(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="job spec (YAML)")],
    set_: SetOption = None,
) -> None:
    """Check a spec without submitting it: exit 0 with a summary, 2 with what is wrong.

    A local data source is read as the API would read it (its fields, labels and partition).
    """
    spec = _spec_or_exit(spec_path, set_)
    from shared.catalog import LocalData
    from shared.data import check_local_data

    try:
        spec = check_local_data(spec)
    except ValueError as error:
        console.print(f"[red]invalid spec:[/red] dataset: {error}", highlight=False)
        raise typer.Exit(2) from None
    source = spec.dataset
    if isinstance(source, LocalData):
        labels = f", classes {source.labels}" if source.labels else ""
        data = f"{source.path} ({source.task}{labels})"
    else:
        data = source
    print(
        f"valid: {spec.name}: {spec.model} on {data}, mode {spec.mode}, {spec.num_clients} clients "
        f"({spec.clients_per_round} a round, {spec.partition.kind} partition), {spec.rounds} rounds"
    )


@app.command()
def submit(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC")],
    set_: SetOption = None,
    api: ApiOption = "http://127.0.0.1:8080",
    token: TokenOption = "",
) -> None:
    """Submit a job to a deployment; prints its id."""
    spec = _spec_or_exit(spec_path, set_)
    with _client(api, token) as client:
        job_id = client.submit(spec)
    print(job_id)


@app.command()
def status(job_id: str, api: ApiOption = "http://127.0.0.1:8080", token: TokenOption = "") -> None:
    """Show a job's state and per-round metrics."""
    with _client(api, token) as client:
        job = client.status(job_id).model_dump(mode="json", by_alias=True)
    table = Table(title=f"{job['id']} — {job['state']} (round {job['round']}/{job['rounds']})")
    for column in ("round", "accuracy", "loss", "train loss", "clients", "kB up", "duration s"):
        table.add_column(column, justify="right")
    for m in job["metrics"]:
        table.add_row(
            str(m["round"]),
            f"{m['accuracy']:.4f}",
            f"{m['loss']:.4f}",
            f"{m['train_loss']:.4f}" if "train_loss" in m else "-",
            str(len(m["clients"])),
            f"{m.get('bytes_up', 0) / 1e3:.1f}",
            f"{m['duration_s']:.1f}" if "duration_s" in m else "-",
        )
    Console().print(table)
    if job.get("error"):
        console.print(f"[red]{job['error']}[/red]")


@app.command()
def wait(
    job_id: str,
    api: ApiOption = "http://127.0.0.1:8080",
    token: TokenOption = "",
    poll: Annotated[float, typer.Option(help="seconds between polls")] = 1.0,
) -> None:
    """Follow a job until it ends; exit code 1 unless it succeeded."""
    with _client(api, token) as client, _progress() as progress:
        first = client.status(job_id)
        bar = _RoundBar(progress, job_id, first.rounds)
        view = client.wait(job_id, lambda view: bar(view.model_dump(mode="json", by_alias=True)), poll_s=poll)
    job = view.model_dump(mode="json", by_alias=True)
    _summary(job)
    if job["state"] != JobState.SUCCEEDED:
        raise typer.Exit(1)


@app.command()
def download(
    job_id: str,
    out: Annotated[Path, typer.Option("-o", "--out", help="destination folder")],
    client_id: Annotated[int | None, typer.Option("--client", help="only this client's model")] = None,
    api: ApiOption = "http://127.0.0.1:8080",
    token: TokenOption = "",
) -> None:
    """Download a job's results: all of them (as `pwff run` writes them), or one client's PEFT folder."""
    with _client(api, token) as client:
        client.download(job_id, out, client_id)
    if client_id is not None:
        console.print(f"client {client_id} adapter in [bold]{out}[/bold]")
    else:
        console.print(f"results in [bold]{out}[/bold]")


@app.command()
def generate(
    job: Annotated[
        str, typer.Argument(metavar="JOB", help="a job id (answered by the API) or a results folder (answered here)")
    ],
    prompt: Annotated[str, typer.Argument(help="the user turn")],
    client: Annotated[int | None, typer.Option(help="answer with this client's model (default: global)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="longest answer, in tokens")] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy; above: sampled")] = 0.0,
    seed: Annotated[int, typer.Option(help="seeds the sampling")] = 0,
    api: ApiOption = "http://127.0.0.1:8080",
    token: TokenOption = "",
) -> None:
    """Try a causal-LM job's result: the answer of its global model, or of one client's, to PROMPT."""
    folder = Path(job)
    if not folder.is_dir():
        body = {"prompt": prompt, "client": client, "max_new_tokens": max_new_tokens, "temperature": temperature}
        with _client(api, token) as http:
            print(http.request("POST", f"/v1/jobs/{job}/generate", json={**body, "seed": seed}).json()["text"])
        return
    from shared import coldstart, generation
    from shared.adapters import build_model
    from shared.models import load_tokenizer
    from shared.settings import Settings, configure_process
    from shared.spec import parse_spec

    def fail(message: str) -> typer.Exit:
        console.print(f"[red]pwff generate:[/red] {message}")
        return typer.Exit(2)

    try:
        spec = parse_spec(json.loads((folder / "metrics.json").read_text())["spec"])
    except (OSError, ValueError, KeyError):
        raise fail(f"{folder} is not a results folder (no readable metrics.json with a spec)") from None
    try:
        generation.check_causal(spec)
    except generation.GenerationError as error:
        raise fail(str(error)) from None
    model_folder = folder / "global" if client is None else folder / "clients" / str(client)
    if not model_folder.is_dir():
        raise fail(f"{model_folder} is missing: the job published no such model")
    settings = Settings()
    configure_process(settings)
    model = build_model(spec, settings.cache_dir)
    tokenizer = load_tokenizer(spec.model, settings.cache_dir)
    try:
        coldstart.state_from_folder(model, model_folder)
        text, _ = generation.generate(
            model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        )
    except (coldstart.ColdStartError, generation.GenerationError) as error:
        raise fail(str(error)) from None
    print(text)


@app.command()
def adapt(
    job: Annotated[
        str, typer.Argument(metavar="JOB", help="a job id (read over the API) or a results folder (pwff run, download)")
    ],
    data: Annotated[
        Path, typer.Option("--data", help="the newcomer's examples: JSON lines of {text, label}, or CSV (text,label)")
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="folder for the adapted model (a PEFT folder)")],
    eval_data: Annotated[
        Path | None, typer.Option("--eval", help="held-out examples, same format: accuracy before and after")
    ] = None,
    steps: Annotated[int, typer.Option(help="local optimizer steps")] = 20,
    lr: Annotated[float | None, typer.Option(help="learning rate (default: the job's)")] = None,
    train: Annotated[
        str | None, typer.Option(help="personal | all (default: personal when the job keeps something personal)")
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(help="global | clients-mean | clients-basis (default: the best the job allows, see the README)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="seeds the minibatch order and dropout")] = 0,
    api: ApiOption = "http://127.0.0.1:8080",
    token: TokenOption = "",
) -> None:
    """Cold start on this machine: a model for a client that never trained, from a job's global part plus a
    few local steps on its own data that fine-tune only its personal part. The data never leaves this machine."""
    import tempfile

    from shared import coldstart
    from shared.adapters import build_model
    from shared.models import extract_archive, load_tokenizer, peft_folder_archive
    from shared.settings import Settings, configure_process
    from shared.spec import parse_spec

    def fail(message: str) -> typer.Exit:
        console.print(f"[red]pwff adapt:[/red] {message}")
        return typer.Exit(2)

    try:
        chosen_train = coldstart.Train(train) if train else None
        chosen_start = coldstart.Start(start) if start else None
    except ValueError:
        raise fail(
            f"--train is personal or all, --start global, clients-mean or clients-basis (got {train}, {start})"
        ) from None
    folder = Path(job)
    with tempfile.TemporaryDirectory(prefix="pwff-adapt-") as tmp:
        client_folders: list[Path] = []
        if folder.is_dir():
            try:
                spec_data = json.loads((folder / "metrics.json").read_text())["spec"]
            except (OSError, ValueError, KeyError):
                raise fail(f"{folder} is not a results folder (no readable metrics.json with a spec)") from None
            global_folder = folder / "global"
            client_folders = sorted(p for p in (folder / "clients").glob("*") if p.is_dir())
        else:
            with _client(api, token) as client:
                spec_data = client.status(job).spec.model_dump(mode="json")
                global_folder = extract_archive(client.global_model(job), Path(tmp) / "global")
                if chosen_start is not coldstart.Start.GLOBAL:
                    for index in range(int(spec_data["num_clients"])):
                        blob = client.client_model(job, index)
                        if blob is not None:
                            client_folders.append(extract_archive(blob, Path(tmp) / f"client-{index}"))
        try:
            spec = parse_spec(spec_data)
        except SpecError as error:
            raise fail(f"the job's spec does not validate here: {error}") from None
        if not global_folder.is_dir():
            raise fail(f"{global_folder} is missing: the job has not published a global model")
        try:
            examples = coldstart.read_examples(data, spec)
            held_out = coldstart.read_examples(eval_data, spec) if eval_data is not None else []
        except coldstart.ColdStartError as error:
            raise fail(str(error)) from None
        settings = Settings()
        configure_process(settings)
        model = build_model(spec, settings.cache_dir)
        tokenizer = load_tokenizer(spec.model, settings.cache_dir)
        try:
            global_state = coldstart.state_from_folder(model, global_folder)
            if chosen_start is None:
                chosen_start = coldstart.default_start(spec, global_state, bool(client_folders))
            clients: list[coldstart.State] = []
            if chosen_start is not coldstart.Start.GLOBAL:
                if not client_folders:
                    raise coldstart.ColdStartError(f"--start {chosen_start}: the job has published no client models")
                clients = [coldstart.state_from_folder(model, path) for path in client_folders]
            begin = coldstart.start_state(spec, global_state, chosen_start, clients)
            result = coldstart.adapt(
                model,
                tokenizer,
                spec,
                begin,
                examples,
                steps,
                train=chosen_train,
                lr=lr,
                seed=seed,
                eval_examples=held_out,
                checkpoints=(0,),
            )
        except coldstart.ColdStartError as error:
            raise fail(str(error)) from None
        extract_archive(peft_folder_archive(model), out)
    line = (
        f"{steps} steps from the {chosen_start.value} start, fine-tuning {len(result.trained)} tensors "
        f"({result.trained_params:,} parameters)"
    )
    if result.train_loss is not None:
        line += f", training loss {result.train_loss:.4f}"
    if result.curve:
        first, last = result.curve[0], result.curve[-1]
        line += f"; held-out accuracy {first.accuracy:.4f} -> {last.accuracy:.4f}"
    console.print(line)
    console.print(f"adapted model in [bold]{out}[/bold]")


@app.command()
def jobs(api: ApiOption = "http://127.0.0.1:8080", token: TokenOption = "") -> None:
    """List jobs, newest first."""
    with _client(api, token) as client:
        listed = client.jobs()
    table = Table()
    for column in ("id", "name", "state", "round"):
        table.add_column(column)
    for job in listed:
        table.add_row(job.id, job.name, str(job.state), str(job.round))
    Console().print(table)


@app.command()
def cancel(job_id: str, api: ApiOption = "http://127.0.0.1:8080", token: TokenOption = "") -> None:
    """Cancel a queued or running job."""
    with _client(api, token) as client:
        job = client.cancel(job_id)
    console.print(f"job {job_id} {job.state}")


@app.command()
def events(job_id: str, api: ApiOption = "http://127.0.0.1:8080", token: TokenOption = "") -> None:
    """What happened to a job: state changes, round commits, clients absent at a deadline, client failures."""
    with _client(api, token) as client:
        listed = client.events(job_id)
    for event in listed:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at))
        print(f"{stamp}  {event.kind:<13} {event.message}")


# -- bound clients: their workers and their identities ------------------------------------------------------

client_app = typer.Typer(help="Bound clients' identities: enroll one (its key pair), revoke one.", no_args_is_help=True)
app.add_typer(client_app, name="client")
ClientsFileOption = Annotated[
    Path | None,
    typer.Option(
        "--clients-file", envvar="PWFF_CLIENTS_FILE", help="the aggregator's clients file (public keys, revoked list)"
    ),
]


def _client_id_or_exit(client_id: str) -> str:
    import re

    from shared.spec import CLIENT_ID_PATTERN

    if not re.match(CLIENT_ID_PATTERN, client_id):
        console.print(f"[red]client identity {client_id!r} must be lowercase letters, digits and '-'[/red]")
        raise typer.Exit(2)
    return client_id


@client_app.command("enroll")
def client_enroll(
    client_id: Annotated[str, typer.Argument(metavar="CLIENT", help="the client's identity, as in clients.ids")],
    out: Annotated[Path, typer.Option("--out", help="folder for the private key <CLIENT>.key (mode 0600)")] = Path(
        "keys"
    ),
    clients_file: ClientsFileOption = None,
) -> None:
    """Make a client's Ed25519 key pair: the private key goes to its worker (--key), the public key is
    registered in the clients file (when given) or printed for you to register."""
    from shared import identity

    client_id = _client_id_or_exit(client_id)
    key_path = out / f"{client_id}.key"
    public = identity.enroll(client_id, key_path, clients_file)
    where = f"registered in {clients_file}" if clients_file else "register it under clients: in the clients file"
    console.print(f"private key of [bold]{client_id}[/bold] in {key_path}: give it to its worker only")
    console.print(f"public key {public} ({where})")
    print(
        json.dumps(
            {
                "client": client_id,
                "key": str(key_path),
                "public_key": public,
                "clients_file": clients_file and str(clients_file),
            }
        )
    )


@client_app.command("revoke")
def client_revoke(
    client_id: Annotated[str, typer.Argument(metavar="CLIENT")],
    clients_file: ClientsFileOption = None,
) -> None:
    """Remove a client's key from the clients file and list it as revoked: the aggregator refuses its
    updates from the next one on (it re-reads the file when it changes)."""
    from shared import identity

    if clients_file is None:
        console.print("[red]--clients-file (or PWFF_CLIENTS_FILE) is needed[/red]")
        raise typer.Exit(2)
    known = identity.revoke(_client_id_or_exit(client_id), clients_file)
    console.print(f"{client_id} revoked in {clients_file}" + ("" if known else " (it was not enrolled)"))


@app.command()
def worker(
    client: Annotated[list[str] | None, typer.Option("--client", help="a bound client identity (repeat)")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="that client's JSONL of {text, label}")] = None,
    key: Annotated[
        list[str] | None, typer.Option("--key", help="that client's private key (pwff client enroll)")
    ] = None,
    key_dir: Annotated[Path | None, typer.Option("--key-dir", help="keys as <dir>/<client>.key")] = None,
) -> None:
    """Start a worker (python -m services.worker) against PWFF_RABBITMQ_URL and PWFF_REDIS_URL: for the given
    bound clients only, each trained and evaluated on its own data file; without --client, a pool worker."""
    from services.worker.__main__ import main as worker_main

    argv: list[str] = []
    for flag, values in (("--client", client), ("--data", data), ("--key", key)):
        for value in values or []:
            argv += [flag, value]
    if key_dir is not None:
        argv += ["--key-dir", str(key_dir)]
    worker_main(argv)


if __name__ == "__main__":
    app()


@app.command("train-reward")
def train_reward(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="folder to write (default: <PWFF cache dir>/rewards/positivity, what align uses)"),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="AdamW steps of 32 tweets")] = REWARD_TRAIN_STEPS,
    seed: Annotated[int, typer.Option(help="seeds the head and the minibatch order")] = 0,
    eval_examples: Annotated[
        int, typer.Option(min=0, help="held-out tweets scored, spread over the test split (0: all 7,449)")
    ] = REWARD_EVAL_EXAMPLES,
) -> None:
    """Train pwff's sentiment reward model (MiniLM-L6 on tweets-sentiment) into an HF sequence-classification
    folder, used by `kind: positivity` rewards (or by `kind: hf` with its path); prints its held-out accuracy."""
    from shared.rewards import train as reward_train
    from shared.settings import Settings, configure_process

    settings = Settings()
    configure_process(settings)
    target = out if out is not None else reward_train.positivity_dir(settings.cache_dir)
    with _progress() as progress:
        task = progress.add_task("train-reward", total=steps, status="starting")

        def advance(step: int, _steps: int, loss: float) -> None:
            progress.update(task, completed=step, status=f"loss {loss:.3f}" if step < steps else "evaluating")

        result = reward_train.train_sentiment(
            target, steps=steps, seed=seed, eval_examples=eval_examples or None, progress=advance
        )
        progress.update(task, status=f"held-out accuracy {result.accuracy:.3f}")
    console.print(
        f"held-out accuracy [bold]{result.accuracy:.4f}[/bold] on {result.eval_examples} test tweets "
        f"(train {result.train_seconds:.0f}s, eval {result.eval_seconds:.0f}s)"
    )
    console.print(f"reward model in [bold]{target}[/bold]")
    print(json.dumps({"path": str(target), "accuracy": round(result.accuracy, 4), "steps": steps, "seed": seed}))
