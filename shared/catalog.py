"""What a job can name: base models and data sets. Pure data, no heavy imports.

The job spec validates `model` and `dataset` against these tables, and the model and data
loaders (`shared.models`, `shared.data`) read them; adding a model or a data set starts here.

Besides the packaged entries a job may bring its own (BYO): `model` may be a local Hugging Face
folder (`local_model_info` reads its config.json and safetensors headers, torch-free) and
`dataset` a `LocalData` source (a JSONL, CSV or Parquet file or a `datasets` save_to_disk folder,
with the fields it names). Both resolve to the same ModelInfo / DatasetInfo as a packaged entry,
so nothing downstream tells them apart.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Task = Literal["classification", "causal-lm"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: Task
    lora_targets: tuple[str, ...]
    hub_id: str
    """What a user would load as the base model elsewhere; written into adapter_config.json."""
    num_params: int
    """Parameters of the base model: what the scheduler's FLOP estimates scale with before loading it."""
    backprop_mb_per_token: float = 0.0
    """Peak memory of one backprop step (LoRA, AdamW) above the loaded model, per token of the batch:
    measured by bench/memory.py (step alone, batch 8 x 256)."""
    forward_mb_per_token: float = 0.0
    """The same for one forward-gradient (fd) step."""

    def step_memory_mb(self, tokens: int, backprop: bool) -> float:
        """Memory a local step needs: runtime and float32 weights, plus the step's own peak."""
        per_token = self.backprop_mb_per_token if backprop else self.forward_mb_per_token
        return 400.0 + 4 * self.num_params / 1e6 + per_token * tokens


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    task: Task
    label_names: tuple[str, ...]
    natural_groups: bool = False
    """Examples carry a natural group (which novel) that a `natural` partition follows."""
    held_out: Literal["global", "own"] = "global"
    """global: a client's held-out examples are drawn from the data set's test split with its label
    mix (packaged sets); own: they are the test part of the client's own shard (BYO data, where a
    client's data is its own)."""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            "minilm-l6",
            "classification",
            ("query", "value"),
            "sentence-transformers/all-MiniLM-L6-v2",
            22_715_141,
            backprop_mb_per_token=680 / 2048,
            forward_mb_per_token=45 / 2048,
        ),
        ModelInfo(
            "smollm2-135m",
            "causal-lm",
            ("q_proj", "v_proj"),
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            134_515_008,
            backprop_mb_per_token=3032 / 2048,
            forward_mb_per_token=68 / 2048,
        ),
        # Tiny test models: figures in the same proportion as MiniLM's, so memory rules can be tested.
        ModelInfo("tiny-bert", "classification", ("query", "value"), "pwff/tiny-bert", 1_011_525, 2.0, 0.1),
        ModelInfo("tiny-llama", "causal-lm", ("q_proj", "v_proj"), "pwff/tiny-llama", 3_166_368, 2.0, 0.1),
    )
}

_BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
# Ordinal order, negative to positive: the usual convention of three-way sentiment models, and it
# keeps "neutral" in the middle for anyone who reads the class index as a score.
_TWEET_CLASSES = ("negative", "neutral", "positive")
# R object name in janeaustenr -> title; indices follow the sorted titles.
AUSTEN_NOVELS = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("bbc-news", "classification", _BBC_CLASSES),
        DatasetInfo("tweets-sentiment", "classification", _TWEET_CLASSES),
        DatasetInfo("jane-austen", "causal-lm", tuple(sorted(AUSTEN_NOVELS.values())), natural_groups=True),
    )
}


def is_model_folder_ref(name: str) -> bool:
    """A `model` value that names a local folder rather than a catalog entry: an absolute or ./ path."""
    return name not in MODELS and name.startswith(("/", "./", "../", "~/"))


def model_info(name: str) -> ModelInfo:
    if name in MODELS:
        return MODELS[name]
    if is_model_folder_ref(name):
        return local_model_info(name)
    raise ValueError(
        f"unknown model {name!r}; known: {', '.join(MODELS)}, or a local model folder (a path starting with / or ./)"
    )


class LocalData(BaseModel):
    """Bring-your-own data: a local file or folder and the fields of its records."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(
        min_length=1,
        max_length=4096,
        description="a .jsonl, .csv or .parquet file, or a folder written by datasets' save_to_disk; read where "
        "the job is submitted (to check it) and by every worker and the aggregator (pool workers share it)",
    )
    format: Literal["auto", "jsonl", "csv", "parquet", "arrow"] = Field(
        "auto", description="auto: from the file name (.jsonl/.json, .csv, .parquet) or a save_to_disk folder"
    )
    text_field: str = Field("text", min_length=1, max_length=200, description="the field holding each example's text")
    label_field: str | None = Field(
        None,
        max_length=200,
        description="the field holding each example's class (a sequence-classification set); unset: a text set "
        "for a causal LM",
    )
    labels: list[str] | None = Field(
        None,
        min_length=2,
        max_length=1000,
        description="the class names in index order; unset: the sorted distinct values of label_field, read "
        "where the job is submitted. A record's label is a class name, or its index",
    )
    group_field: str | None = Field(
        None,
        max_length=200,
        description="the field a `natural` partition follows (e.g. a site or an author): one group per client",
    )

    @property
    def key(self) -> str:
        """A canonical string for this source: what caches and seeds are keyed on."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def task(self) -> Task:
        return "classification" if self.label_field else "causal-lm"


DatasetRef = str | LocalData
"""A packaged data set's name or a local source."""


def dataset_key(ref: DatasetRef) -> str:
    return ref.key if isinstance(ref, LocalData) else ref


def dataset_ref(key: str) -> DatasetRef:
    """The inverse of `dataset_key`: cached functions take the key and rebuild the source."""
    return LocalData.model_validate_json(key) if key.startswith("{") else key


def dataset_info(ref: DatasetRef) -> DatasetInfo:
    if isinstance(ref, LocalData):
        return _local_dataset_info(ref.key)
    try:
        return DATASETS[ref]
    except KeyError:
        raise ValueError(f"unknown data set {ref!r}; known: {', '.join(DATASETS)}, or a local source") from None


@functools.lru_cache(maxsize=64)
def _local_dataset_info(key: str) -> DatasetInfo:
    source = LocalData.model_validate_json(key)
    if source.label_field:
        if source.labels is not None:
            names = tuple(source.labels)
        else:
            from shared.data import infer_labels  # reads the data: numpy and pyarrow, no torch

            names = infer_labels(source)
    else:
        names = ()
    return DatasetInfo(source.path, source.task, names, natural_groups=source.group_field is not None, held_out="own")


# -- local model folders ---------------------------------------------------------------------------


class ModelFolderError(ValueError):
    """A `model` path that pwff will not load; the message says why in plain words."""


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _safetensors_params(path: Path) -> int:
    # A safetensors file starts with an 8-byte little-endian header length and a JSON header
    # listing every tensor's shape: the parameter count without loading a weight.
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")


@functools.cache
def peft_default_targets() -> dict[str, tuple[str, ...]]:
    """peft's per-architecture default LoRA targets (model_type -> module names), read torch-free.

    peft keeps them in a dict literal in peft/utils/constants.py, whose module imports torch;
    parsing the literal lets the spec check them where the job is submitted. Empty if peft's
    layout changed: the worker's own `get_peft_model` still applies the same defaults.
    """
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return {}
    source = Path(next(iter(spec.submodule_search_locations))) / "utils" / "constants.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"
            for t in node.targets
        ):
            try:
                mapping = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return {str(k): tuple(v) for k, v in mapping.items()}
    return {}


def local_model_info(path: str) -> ModelInfo:
    folder = Path(path).expanduser()
    config_file = folder / "config.json"
    try:
        stamp = config_file.stat().st_mtime_ns
    except OSError:
        if not folder.is_dir():
            raise ModelFolderError(f"model {path!r}: no such folder") from None
        raise ModelFolderError(
            f"model {path!r} is not a Hugging Face model folder (no config.json); save one with save_pretrained"
        ) from None
    return _local_model_info(str(folder.resolve()), stamp)


@functools.lru_cache(maxsize=32)
def _local_model_info(folder_name: str, _stamp: int) -> ModelInfo:
    folder = Path(folder_name)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"model {folder_name!r}: config.json is not readable JSON ({error})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelFolderError(f"model {folder_name!r}: config.json names no model_type; not a transformers model")
    if config.get("auto_map"):
        raise ModelFolderError(
            f"model {folder_name!r} needs custom code (auto_map in config.json); pwff never runs a model's own code"
        )
    architectures = [str(a) for a in config.get("architectures") or []]
    task: Task = "causal-lm" if any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures) else "classification"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        if pickled:
            raise ModelFolderError(
                f"model {folder_name!r} has only pickle weights ({', '.join(pickled[:3])}), which can run code when "
                "loaded; pwff loads safetensors only: re-save it with save_pretrained(..., safe_serialization=True)"
            )
        raise ModelFolderError(f"model {folder_name!r} has no weights (*.safetensors)")
    try:
        num_params = sum(_safetensors_params(p) for p in weights)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
        raise ModelFolderError(f"model {folder_name!r}: unreadable safetensors header ({error})") from None
    model_type = str(config["model_type"])
    # Memory per token scales with the model from the packaged model of the same task (measured).
    reference = MODELS["smollm2-135m" if task == "causal-lm" else "minilm-l6"]
    scale = num_params / reference.num_params
    return ModelInfo(
        folder_name,
        task,
        peft_default_targets().get(model_type, ()),
        folder_name,
        num_params,
        backprop_mb_per_token=reference.backprop_mb_per_token * scale,
        forward_mb_per_token=reference.forward_mb_per_token * scale,
    )


def model_type_of(name: str) -> str:
    """A local folder's model_type (config.json), for messages."""
    try:
        return str(json.loads((Path(name).expanduser() / "config.json").read_text(encoding="utf-8"))["model_type"])
    except (OSError, ValueError, KeyError):
        return "unknown"
