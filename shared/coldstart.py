"""Cold start: a client that never trained gets a model from a job's global part plus a few local steps.

A newcomer starts from the job's global trainable state (what the aggregator committed last)
and fine-tunes, on its own examples, only its personal part: the tensors the job's preset (and
`personalization.personal`) keeps with each client, at their initial values. A job without a
personal part (FedAvg, `preset: none`) has nothing else a newcomer could train, so there it
fine-tunes the whole trainable state (LoRA and head), the usual "FedAvg + local fine-tuning".

Where a newcomer starts matters for PWFF: its personal LoRA starts as a no-op, and the global
part alone (adapter and head) was only ever trained on top of the clients' own LoRAs, so
`Start.CLIENTS_MEAN` starts it instead from the clients' published personal parts, merged
(`mean_personal`): for LoRA pairs the mean of the clients' low-rank updates B A, projected back
to rank r by SVD, so the merged pair is the best rank-r approximation of the mean update.

Used by `pwff adapt`, by the API's adapt endpoint and by bench/pwff.py. A newcomer's own data
for the benchmark and the tests comes from `newcomer_examples`: drawn from the held-out test
split, which no client trains on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from shared import data
from shared.adapters import ModelCache
from shared.batches import collate, minibatches
from shared.catalog import dataset_info, model_info
from shared.data import Example
from shared.evaluation import evaluate
from shared.models import GLOBAL_RNG_LOCK, load_trainable_state, trainable_state
from shared.personalization import is_personal
from shared.seeding import derive_seed
from shared.spec import JobSpec
from shared.state import Repositories

State = dict[str, torch.Tensor]

MAX_STEPS = 1000
MAX_EXAMPLES = 4096
MAX_TEXT_CHARS = 20_000


class ColdStartError(ValueError):
    """Input a newcomer's adaptation cannot use; the message says what is wrong, on one line."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field
        """The request field at fault (train, start, steps, examples), if one is."""


class Train(StrEnum):
    """Which tensors a newcomer fine-tunes."""

    PERSONAL = "personal"
    """The job's personal part (the default when the job has one)."""
    ALL = "all"
    """The whole trainable state (the default, and the only choice, when nothing is personal)."""


class Start(StrEnum):
    """Where a newcomer's personal part starts."""

    GLOBAL = "global"
    """Its initial values, as in the published global model."""
    CLIENTS_MEAN = "clients-mean"
    """The clients' published personal parts, merged (`mean_personal`)."""
    CLIENTS_BASIS = "clients-basis"
    """The merged LoRA A of `CLIENTS_MEAN` with B zero: the model starts exactly as the global part
    alone (the LoRA is a no-op), but its first steps move in the directions the clients' LoRAs found."""


def personalizes(spec: JobSpec, names: Iterable[str]) -> bool:
    return any(is_personal(spec, name) for name in names)


def trained_names(spec: JobSpec, names: Iterable[str], train: Train | None = None) -> list[str]:
    """The tensors a newcomer fine-tunes: its personal part, or everything (`Train.ALL`, or no personal part)."""
    names = sorted(names)
    personal = [name for name in names if is_personal(spec, name)]
    if train is None:
        train = Train.PERSONAL if personal else Train.ALL
    if train is Train.ALL:
        return names
    if not personal:
        raise ColdStartError(
            f"preset {spec.personalization.preset!r} keeps nothing personal: use train 'all'", field="train"
        )
    return personal


# --- where a newcomer starts --------------------------------------------------------------------


def mean_personal(spec: JobSpec, global_state: Mapping[str, torch.Tensor], clients: Sequence[State]) -> State:
    """The clients' personal parts merged into one: the start `Start.CLIENTS_MEAN` gives a newcomer.

    A LoRA pair (lora_A, lora_B of one module) whose tensors are both personal becomes the rank-r
    truncated SVD of the mean of the clients' products B_i A_i, split evenly between the two
    factors (B = U sqrt(S), A = sqrt(S) V^T): the best rank-r pair for the mean update, where
    averaging A and B separately would not be (the mean of products is not the product of means).
    Any other personal tensor is averaged. Clients weigh alike: a newcomer is nobody in particular.
    """
    if not clients:
        raise ColdStartError("no client personal parts to merge")
    personal = sorted(name for name in global_state if is_personal(spec, name))
    for index, state in enumerate(clients):
        missing = [name for name in personal if name not in state]
        if missing:
            raise ColdStartError(f"client state {index} lacks personal tensor {missing[0]!r}")
    merged: State = {}
    for name in personal:
        if name in merged:
            continue
        partner = name.replace("lora_A", "lora_B") if "lora_A" in name else name.replace("lora_B", "lora_A")
        if partner != name and partner in personal:
            a_name, b_name = (name, partner) if "lora_A" in name else (partner, name)
            rank = global_state[a_name].shape[0]
            product = torch.stack([c[b_name].double() @ c[a_name].double() for c in clients]).mean(dim=0)
            u, s, vh = torch.linalg.svd(product, full_matrices=False)
            root = s[:rank].sqrt()
            merged[b_name] = (u[:, :rank] * root).float()
            merged[a_name] = (root[:, None] * vh[:rank]).float()
        else:
            merged[name] = torch.stack([c[name].double() for c in clients]).mean(dim=0).float()
    return merged


def default_start(spec: JobSpec, global_state: Mapping[str, torch.Tensor], clients_published: bool) -> Start:
    """The start that served newcomers best in bench/pwff.py: `CLIENTS_BASIS` when the job keeps whole
    LoRAs personal (pwff) and has published its clients' models, else `GLOBAL` (for FedSA, whose
    personal B starts at zero over a global A, merging the clients' B only slowed newcomers down)."""
    if clients_published and personal_lora_pairs(spec, global_state):
        return Start.CLIENTS_BASIS
    return Start.GLOBAL


def start_state(
    spec: JobSpec, global_state: Mapping[str, torch.Tensor], start: Start, clients: Sequence[State] = ()
) -> State:
    """The state a newcomer starts from: the global state, with `Start.CLIENTS_MEAN` its personal part merged."""
    state = dict(global_state)
    if start is not Start.GLOBAL:
        if not personalizes(spec, state):
            raise ColdStartError(
                f"preset {spec.personalization.preset!r} keeps nothing personal to merge", field="start"
            )
        merged = mean_personal(spec, state, clients)
        if start is Start.CLIENTS_BASIS:
            for name in personal_lora_pairs(spec, state):
                merged[name.replace("lora_A", "lora_B")] = torch.zeros_like(state[name.replace("lora_A", "lora_B")])
        state.update(merged)
    return state


def personal_lora_pairs(spec: JobSpec, names: Iterable[str]) -> list[str]:
    """The lora_A names whose lora_B is personal too: the LoRAs a newcomer owns whole."""
    names = set(names)
    return sorted(
        name
        for name in names
        if "lora_A" in name
        and is_personal(spec, name)
        and name.replace("lora_A", "lora_B") in names
        and is_personal(spec, name.replace("lora_A", "lora_B"))
    )


# --- local steps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    steps: int
    accuracy: float | None
    """Accuracy on the evaluation examples after `steps` local steps (None without them)."""
    loss: float | None
    train_loss: float | None
    """Mean training loss of the steps so far (None at 0 steps)."""


@dataclass
class Adaptation:
    state: State
    """The newcomer's whole trainable state after the last step."""
    trained: list[str]
    trained_params: int
    steps: int
    train_loss: float | None
    curve: list[Checkpoint] = field(default_factory=list)


def adapt(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    spec: JobSpec,
    start: Mapping[str, torch.Tensor],
    examples: Sequence[Example],
    steps: int,
    *,
    train: Train | None = None,
    lr: float | None = None,
    seed: int = 0,
    eval_examples: Sequence[Example] = (),
    checkpoints: Iterable[int] = (),
) -> Adaptation:
    """`steps` local optimizer steps from `start` on `examples`, fine-tuning only `trained_names`.

    The job's optimizer and batch size, `lr` replacing its learning rate. With `eval_examples`,
    the model is evaluated after every step count in `checkpoints` (0: before any step) and after
    the last step. `model` is the job's model (`shared.adapters.build_model`); it is left loaded
    with the adapted state, its parameters' requires_grad as they were.
    """
    if not 0 <= steps <= MAX_STEPS:
        raise ColdStartError(f"steps must be between 0 and {MAX_STEPS}, got {steps}", field="steps")
    if steps and not examples:
        raise ColdStartError("no training examples", field="examples")
    task = model_info(spec.model).task
    load_trainable_state(model, start)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    trained = trained_names(spec, params, train)
    marks = sorted({s for s in checkpoints if 0 <= s <= steps} | {steps}) if eval_examples else []
    curve: list[Checkpoint] = []
    losses: list[float] = []

    def checkpoint(done: int) -> None:
        figures = evaluate(model, tokenizer, eval_examples, task, spec.max_length) if eval_examples else {}
        curve.append(
            Checkpoint(
                steps=done,
                accuracy=figures.get("accuracy"),
                loss=figures.get("loss"),
                train_loss=float(np.mean(losses)) if losses else None,
            )
        )

    frozen = [p for name, p in params.items() if name not in set(trained)]
    try:
        for p in frozen:
            p.requires_grad_(False)
        chosen = [params[name] for name in trained]
        opt = spec.optimizer
        rate = lr if lr is not None else opt.lr
        optimizer: torch.optim.Optimizer
        if opt.name == "sgd":
            optimizer = torch.optim.SGD(chosen, lr=rate, momentum=opt.momentum, weight_decay=opt.weight_decay)
        else:
            optimizer = torch.optim.AdamW(chosen, lr=rate, weight_decay=opt.weight_decay)
        device = next(model.parameters()).device
        batches = minibatches(examples, min(spec.batch_size, len(examples)) if examples else 1, seed)
        if 0 in marks:
            checkpoint(0)
        with GLOBAL_RNG_LOCK:  # dropout draws from torch's process-wide generator
            torch.manual_seed(seed)
            for done in range(1, steps + 1):
                model.train()
                batch = collate(tokenizer, next(batches), task, spec.max_length, device)
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if done in marks:
                    model.eval()
                    checkpoint(done)
        model.eval()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return Adaptation(
        state=trainable_state(model),
        trained=trained,
        trained_params=sum(params[name].numel() for name in trained),
        steps=steps,
        train_loss=float(np.mean(losses)) if losses else None,
        curve=curve,
    )


# --- a newcomer's data --------------------------------------------------------------------------


def newcomer_examples(
    spec: JobSpec, index: int, train_size: int, test_size: int
) -> tuple[list[Example], list[Example]]:
    """A newcomer's training and test examples, distinct texts, drawn from the held-out test split.

    No client of the job trains on the test split, so the newcomer's data is new to the federation.
    Its label mix follows the job's partition: Dirichlet(alpha) proportions for `dirichlet`, one
    natural group for `natural`, uniform for `iid`; labels are dealt to the examples from those
    proportions, so train and test share the mix. Deterministic in (spec's data set, partition,
    seed, index).
    """
    test = data.load(spec.dataset, "test")
    labels = sorted({e.label for e in test})
    rng = np.random.Generator(np.random.PCG64(derive_seed("newcomer", spec.dataset, spec.seed, index)))
    kind = spec.partition.kind
    if kind == "dirichlet":
        proportions = rng.dirichlet(np.full(len(labels), spec.partition.alpha))
    elif kind == "natural":
        proportions = np.eye(len(labels))[int(rng.integers(len(labels)))]
    else:
        proportions = np.full(len(labels), 1.0 / len(labels))
    # One index per distinct text: a text the split holds twice must not be in both of the newcomer's sets.
    first = {e.text: i for i, e in reversed(list(enumerate(test)))}
    pools = {label: [i for i in sorted(first.values()) if test[i].label == label] for label in labels}
    for pool in pools.values():
        rng.shuffle(pool)
    wanted = train_size + test_size
    if wanted > len(first):
        raise ColdStartError(f"{wanted} newcomer examples wanted, the test split has {len(first)} distinct ones")
    chosen: list[int] = []
    while len(chosen) < wanted:
        open_labels = [i for i, label in enumerate(labels) if pools[label]]
        weights = proportions[open_labels]
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(open_labels), 1 / len(open_labels))
        label = labels[open_labels[int(rng.choice(len(open_labels), p=weights))]]
        chosen.append(pools[label].pop())
    examples = [test[i] for i in chosen]
    return examples[:train_size], examples[train_size:]


def read_examples(path: Path, spec: JobSpec) -> list[Example]:
    """Labeled examples from a JSON-lines file ({"text": ..., "label": ...} per line) or a CSV file
    with `text` and `label` columns. A label is a class index or a class name of the job's data
    set; causal-LM jobs need only the text."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ColdStartError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ColdStartError(f"{path} is not UTF-8 text") from None
    rows: list[tuple[str, dict[str, object]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(raw.splitlines())
        if reader.fieldnames is None or "text" not in reader.fieldnames:
            raise ColdStartError(f"{path}: a CSV file needs a header with a 'text' column (and 'label')")
        rows = [(f"{path}:{n}", dict(row)) for n, row in enumerate(reader, start=2)]
    else:
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ColdStartError(f"{path}:{n}: not JSON ({error.msg}); expected one object per line") from None
            if not isinstance(row, dict):
                raise ColdStartError(f"{path}:{n}: expected an object with 'text' and 'label'")
            rows.append((f"{path}:{n}", row))
    examples = [example_from(row.get("text"), row.get("label"), spec, where) for where, row in rows]
    if not examples:
        raise ColdStartError(f"{path} has no examples")
    if len(examples) > MAX_EXAMPLES:
        raise ColdStartError(f"{path} has {len(examples)} examples; at most {MAX_EXAMPLES} are accepted")
    return examples


def example_from(text: object, label: object, spec: JobSpec, where: str = "example") -> Example:
    """One checked example: non-empty text, and for a classifier a label of the job's data set."""
    if not isinstance(text, str) or not text.strip():
        raise ColdStartError(f"{where}: 'text' must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise ColdStartError(f"{where}: text of {len(text)} characters; at most {MAX_TEXT_CHARS}")
    info = dataset_info(spec.dataset)
    if info.task != "classification":
        return Example(text, 0)
    names = info.label_names
    index: int | None = None
    if isinstance(label, str):
        if label.strip() in names:
            return Example(text, names.index(label.strip()))
        if not label.strip().isdigit():
            raise ColdStartError(f"{where}: unknown label {label!r}; known: {', '.join(names)}")
        index = int(label.strip())
    elif isinstance(label, int) and not isinstance(label, bool):
        index = label
    if index is None or not 0 <= index < len(names):
        raise ColdStartError(
            f"{where}: 'label' must be a class index 0..{len(names) - 1} or one of {', '.join(names)}, got {label!r}"
        )
    return Example(text, index)


# --- published folders --------------------------------------------------------------------------


def state_from_folder(model: torch.nn.Module, folder: Path) -> State:
    """The trainable state of a published model folder, loaded into `model` (the job's model).

    A PEFT folder (adapter_config.json + adapter_model.safetensors) or, for full fine-tuning, a
    transformers folder (config.json + model.safetensors).
    """
    import safetensors.torch
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if isinstance(model, PeftModel):
        if not (folder / "adapter_config.json").is_file():
            raise ColdStartError(f"{folder} is not a PEFT folder (no adapter_config.json)")
        result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ColdStartError(f"{folder} does not fit the job's model: unexpected {unexpected[:3]}")
    else:
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ColdStartError(f"{folder} is not a full-weights folder (no model.safetensors)")
        loaded = safetensors.torch.load_file(str(weights))
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(loaded))
        if missing:
            raise ColdStartError(f"{folder} does not fit the job's model: missing {missing[:3]}")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in loaded:
                    param.copy_(loaded[name].to(param.device, param.dtype))
    return trainable_state(model)


def personal_parts(spec: JobSpec, model: torch.nn.Module, archives: Iterable[bytes]) -> list[State]:
    """The personal parts of published client models (tar.gz archives), read through `model`."""
    import tempfile

    from shared.models import extract_archive

    parts: list[State] = []
    for blob in archives:
        with tempfile.TemporaryDirectory(prefix="pwff-client-") as tmp:
            state = state_from_folder(model, extract_archive(blob, Path(tmp)))
        parts.append({name: value for name, value in state.items() if is_personal(spec, name)})
    return parts


# --- serving an adaptation from a deployment's store --------------------------------------------


class NotReady(RuntimeError):
    """The job has not published what the adaptation needs yet (a committed state, client models)."""


@dataclass(frozen=True)
class Served:
    round: int
    start: Start
    train: Train
    adaptation: Adaptation
    before: Checkpoint | None
    after: Checkpoint | None
    archive: bytes


def serve(
    repos: Repositories,
    models: ModelCache,
    job_id: str,
    spec: JobSpec,
    examples: Sequence[Example],
    steps: int,
    *,
    start: Start | None = None,
    train: Train | None = None,
    lr: float | None = None,
    seed: int = 0,
    eval_examples: Sequence[Example] = (),
) -> Served:
    """A newcomer's adapted model from what a job published in the store (the API's adapt endpoint).

    Starts from the latest committed global state; `Start.CLIENTS_MEAN` (the default when the job
    has a personal part and has published its clients' models) merges the published clients'
    personal parts into it (`mean_personal`).
    """
    from shared.codec import decode_tensors
    from shared.models import peft_folder_archive

    history = repos.rounds.history(job_id)
    if not history:
        raise NotReady(f"job {job_id} has not committed its initial state yet")
    round_ = history[-1].round
    blob = repos.tensors.global_state(job_id, round_)
    if blob is None:
        raise NotReady(f"the global state of job {job_id} round {round_} is gone")
    global_state = decode_tensors(blob)
    model, tokenizer = models.get(spec)
    archives = [
        archive
        for client in range(spec.num_clients)
        if (archive := repos.tensors.archive(job_id, f"client-{client}")) is not None
    ]
    personal = personalizes(spec, global_state)
    chosen = train or (Train.PERSONAL if personal else Train.ALL)
    trained_names(spec, global_state, chosen)  # refuses `personal` when nothing is, before any work
    if start is None:
        start = default_start(spec, global_state, bool(archives))
    clients: list[State] = []
    if start is not Start.GLOBAL:
        if not personal:
            raise ColdStartError(
                f"preset {spec.personalization.preset!r} keeps nothing personal to merge", field="start"
            )
        if not archives:
            raise NotReady(f"job {job_id} has not published its clients' models yet (they are, when it ends)")
        clients = personal_parts(spec, model, archives)
    adaptation = adapt(
        model,
        tokenizer,
        spec,
        start_state(spec, global_state, start, clients),
        examples,
        steps,
        train=chosen,
        lr=lr,
        seed=seed,
        eval_examples=eval_examples,
        checkpoints=(0,),
    )
    curve = adaptation.curve
    return Served(
        round=round_,
        start=start,
        train=chosen,
        adaptation=adaptation,
        before=curve[0] if curve else None,
        after=curve[-1] if curve else None,
        archive=peft_folder_archive(model),
    )
