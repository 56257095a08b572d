"""Answers from a job's causal LM: the global model or one client's, for a person to try the result.

The API (`POST /v1/jobs/{id}/generate`) answers from the store (the latest committed global state,
plus the client's latest personal state); `pwff generate` answers from a results folder on this
machine, or asks the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from shared.catalog import model_info
from shared.codec import decode_tensors
from shared.models import GLOBAL_RNG_LOCK, load_trainable_state
from shared.personalization import personal_names
from shared.spec import JobSpec
from shared.state import Repositories

MAX_NEW_TOKENS = 512


class GenerationError(ValueError):
    """A request the job cannot answer; `field` names what is wrong ("" for the job itself)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class NotReady(RuntimeError):
    """The job has nothing to answer from yet (no committed state, or the client never trained)."""


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int
    round: int
    """The committed round whose state answered (-1 when answered from a folder)."""
    model: str
    """"global" or "client-<n>"."""


def check_causal(spec: JobSpec) -> None:
    if model_info(spec.model).task != "causal-lm":
        raise GenerationError(f"model {spec.model!r} of this job is a sequence classifier: it does not generate")


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, message: str) -> list[int]:
    """Token ids of `message` as a user turn, ready for the assistant's answer (plain text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        ids: Any = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # some transformers versions answer a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(message)["input_ids"]]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
) -> tuple[str, int]:
    """The model's answer to `prompt` as a user turn (its chat template), greedy when temperature is 0."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise GenerationError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}", "max_new_tokens")
    device = next(model.parameters()).device
    input_ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)], device=device)
    options: dict[str, object] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_k=None, top_p=1.0)
    else:
        options.update(do_sample=False)
    model.eval()
    with GLOBAL_RNG_LOCK:
        torch.manual_seed(seed)
        output = model.generate(  # type: ignore[operator]
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **options
        )
    new = output[0, input_ids.shape[1] :]
    text = str(tokenizer.decode(new, skip_special_tokens=True))
    return text.strip(), int(new.numel())


def answer_from_store(
    repos: Repositories,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    job_id: str,
    spec: JobSpec,
    prompt: str,
    client: int | None = None,
    **options: float,
) -> Answer:
    """Answer with the job's latest committed global state, plus `client`'s latest personal state."""
    check_causal(spec)
    if client is not None and not 0 <= client < spec.num_clients:
        raise GenerationError(f"client {client} out of range: the job has {spec.num_clients} clients", "client")
    history = repos.rounds.history(job_id)
    if not history:
        raise NotReady(f"job {job_id} has not committed its initial state yet")
    round_ = history[-1].round
    blob = repos.tensors.global_state(job_id, round_)
    if blob is None:
        raise NotReady(f"the global state of job {job_id} round {round_} is gone")
    state = decode_tensors(blob)
    if client is not None:
        found = repos.tensors.latest_personal(job_id, client, (round_ + 1, 0))
        if found is not None:
            state.update(decode_tensors(found[1]))
        elif personal_names(spec, state):
            raise NotReady(f"client {client} of job {job_id} has not trained yet: it has no personal state")
    load_trainable_state(model, state)
    text, tokens = generate(
        model,
        tokenizer,
        prompt,
        max_new_tokens=int(options.get("max_new_tokens", 64)),
        temperature=float(options.get("temperature", 0.0)),
        seed=int(options.get("seed", 0)),
    )
    return Answer(text, tokens, round_, "global" if client is None else f"client-{client}")
