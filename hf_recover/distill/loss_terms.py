"""The loss terms a distillation step computes (`ce`, `kd`, `align`, `fdd`, ...), gathered per micro-batch and logged
as exact token-weighted means: Trainer's logs get them on `logging_steps`, its evaluation metrics at the end of an
evaluation, never from inside `compute_loss` (as TRL's trainers gather their metrics)."""

from __future__ import annotations

from collections import defaultdict

import torch

from ..base.constants import IGNORE_INDEX

MODES = ("train", "eval")


class LossTerms:
    """Per mode (`train`, `eval`), each term's sum over the valid tokens recorded since the last `averaged` call."""

    def __init__(self):
        self.recorded: dict[str, defaultdict[str, list[torch.Tensor]]] = {mode: defaultdict(list) for mode in MODES}

    def record(self, terms: dict[str, torch.Tensor], labels: torch.Tensor, num_items_in_batch, mode: str) -> None:
        """Record one micro-batch's terms, each a mean over its valid tokens (or divided by `num_items_in_batch`)."""
        # Each term is (sum over this batch's valid tokens) / count: store the sum and the tokens, so that the
        # logged value is the exact token-weighted mean since the last log, across micro-batches and processes.
        num_tokens = labels[..., 1:].ne(IGNORE_INDEX).sum()
        count = num_tokens if num_items_in_batch is None else num_items_in_batch
        recorded = self.recorded[mode]
        for name, value in terms.items():
            recorded[name].append((value.detach().float() * count).reshape(()))
        recorded["num_tokens"].append(num_tokens.detach().float().reshape(()))

    def clear(self, mode: str) -> None:
        self.recorded[mode].clear()

    def averaged(self, mode: str, accelerator, prefix: str = "") -> dict[str, float]:
        """The recorded terms since the last call, token-weighted over micro-batches and processes; then cleared."""
        recorded = self.recorded[mode]
        if not recorded:
            return {}
        names = sorted(recorded)
        totals = torch.stack([torch.stack(recorded[name]).sum() for name in names])
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum")
        totals = dict(zip(names, totals.tolist()))
        tokens = max(totals.pop("num_tokens"), 1.0)
        recorded.clear()
        return {f"{prefix}{name}": total / tokens for name, total in totals.items()}
