"""On-policy distillation: on a share `lmbda` of the training batches, the student answers the batch's prompts itself
and learns from the teacher's view of its own answers (GKD, Agarwal et al., "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", 2024; λ is GKD's name for that share).

A student trained only on the teacher's text never sees its own mistakes: once it drifts (a loop, a wrong turn) it
is off the data it was trained on. On an on-policy batch, every row with a prompt (`prompt_length > 0`: a chat row)
is answered by the student, sampled at `temperature` with the KV cache (`hf_recover.base.generation`); the teacher
scores those tokens in the usual forward, and the loss is the distillation term alone on them (no cross-entropy:
the student's own samples are not targets). Text rows have no prompt and leave the batch for that step.
"""

from __future__ import annotations

from typing import Any

import torch

from ..base.chat import end_of_turn_ids
from ..base.constants import IGNORE_INDEX
from ..base.generation import Sampling, generate_completions

PROMPT_LENGTH_COLUMN = "prompt_length"
"""How many tokens of a row are its prompt (0 for text rows), as `hf_recover.base.chat.prepare_chat_dataset` writes
it: what on-policy batches keep and answer."""


def check_on_policy_inputs(lmbda: float, train_dataset: Any, tokenizer: Any) -> None:
    """Refuse on-policy batches (`lmbda > 0`) that could never happen, when the trainer is built: without a
    tokenizer the student cannot answer, and a training set whose rows have no prompt (`prompt_length` 0 or
    absent: text only) gives it nothing to answer. A dataset that cannot be read ahead (streamed) is not checked."""
    if tokenizer is None:
        raise ValueError(
            f"lmbda={lmbda} has the student answer the batches' prompts, which needs the tokenizer (its pad and "
            "end-of-turn tokens): pass processing_class=tokenizer, or set lmbda=0."
        )
    columns = getattr(train_dataset, "column_names", None)
    if train_dataset is None or columns is None or not hasattr(train_dataset, "with_format"):
        return
    prompts = PROMPT_LENGTH_COLUMN in columns and len(train_dataset) > 0
    if prompts:  # the column alone, as Arrow: no row is decoded
        import pyarrow.compute as pc

        prompts = (pc.max(train_dataset.with_format("arrow")[PROMPT_LENGTH_COLUMN]).as_py() or 0) > 0
    if not prompts:
        raise ValueError(
            f"lmbda={lmbda} has the student answer the prompts of chat rows, and no row of train_dataset has one "
            f"(no '{PROMPT_LENGTH_COLUMN}' > 0; its columns: {columns}): every batch would stay off-policy. Train on "
            "chat rows too (hf_recover.base.chat.prepare_chat_dataset, or teacher_mixture with chat_fraction > 0), "
            "or set lmbda=0."
        )


def on_policy_batch(
    model: torch.nn.Module, inputs: dict[str, Any], tokenizer: Any, sampling: Sampling, seed: int
) -> dict[str, torch.Tensor] | None:
    """The batch's chat rows, each its prompt followed by `model`'s own answer, with labels on the answer only;
    None when the batch has no row with a prompt."""
    lengths = inputs.get(PROMPT_LENGTH_COLUMN)
    if lengths is None:
        return None
    rows = [r for r, n in enumerate(lengths.tolist()) if n > 0]
    if not rows:
        return None
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompts = [ids[r, : int(lengths[r])][mask[r, : int(lengths[r])].bool()].tolist() for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = generate_completions(
        model, prompts, stop_ids=end_of_turn_ids(model, tokenizer), pad_id=pad, sampling=sampling,
        batch_size=len(prompts), seed=seed,
    )  # fmt: skip
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    batch = {
        "input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
    }
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        end = len(prompt) + len(answer)
        batch["input_ids"][i, :end] = torch.as_tensor(prompt + answer)
        batch["attention_mask"][i, :end] = 1
        batch["labels"][i, len(prompt) : end] = torch.as_tensor(answer, dtype=torch.long)
    return {name: tensor.to(ids.device) for name, tensor in batch.items()}
