"""Measure recovery: perplexity, recovery % and retention."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .constants import IGNORE_INDEX
from .data import iter_batches, num_batches


@torch.inference_mode()
def evaluate_perplexity(
    model: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    desc: str = "Perplexity",
) -> dict[str, float]:
    """Token-weighted perplexity of a causal LM over the valid next-token labels of `dataset`.

    `dataset` is prepared by `prepare_recovery_dataset` (or is a DataLoader of such batches). Position
    `t` is scored against label `t + 1`; labels equal to -100 are skipped. Returns `perplexity`
    (`exp(nll)`), `nll` (mean negative log-likelihood in nats) and `tokens` (how many were scored).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        batches = iter_batches(dataset, batch_size=batch_size, max_batches=max_batches, device=device)
        total = num_batches(dataset, batch_size=batch_size, max_batches=max_batches)
        for batch in tqdm(batches, total=total, desc=desc, leave=False):
            labels = batch.get("labels", batch["input_ids"])
            if "attention_mask" in batch and "labels" not in batch:
                labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            # (B, T, V) -> predictions for positions 0..T-2 against labels 1..T-1
            shift_logits = logits[:, :-1].flatten(0, 1).float()
            shift_labels = labels[:, 1:].flatten()
            total_nll += F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("The dataset has no valid next-token label (all labels are -100): nothing to score.")
    nll = total_nll / total_tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": total_tokens}


def recovery_metrics(teacher_ppl: float, pruned_ppl: float, recovered_ppl: float) -> dict[str, float]:
    """Recovery and retention from three perplexities (DESIGN.md, book ch. 6).

    `recovery = (PPL_pruned - PPL_recovered) / (PPL_pruned - PPL_teacher)`: the fraction of the gap
    that pruning opened and recovery closed (1.0 = back to the teacher; may exceed 1 or go negative).
    `retention = PPL_teacher / PPL_recovered` and `pruned_retention = PPL_teacher / PPL_pruned`.
    """
    for name, value in (("teacher_ppl", teacher_ppl), ("pruned_ppl", pruned_ppl), ("recovered_ppl", recovered_ppl)):
        if not value > 0:
            raise ValueError(f"{name} must be a positive perplexity, got {value}.")
    gap = pruned_ppl - teacher_ppl
    return {
        "recovery": (pruned_ppl - recovered_ppl) / gap if gap != 0 else float("nan"),
        "retention": teacher_ppl / recovered_ppl,
        "pruned_retention": teacher_ppl / pruned_ppl,
    }


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of `model`, counting tied weights once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
