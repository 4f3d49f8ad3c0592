"""Which token positions a loss scores and how their sum is normalised, shared by every token loss.

Position `t` of a causal LM is scored against label `t + 1` (Hugging Face's shifted causal-LM convention);
positions whose next label is `IGNORE_INDEX` do not count. A sum over the counted positions is divided by
their number, or by `num_items_in_batch` under gradient accumulation (the `Trainer` convention).
"""

from __future__ import annotations

from numbers import Real

import torch

from ..constants import IGNORE_INDEX


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) next-token targets: position `t` is scored against label `t + 1`, as in Hugging Face's causal-LM
    loss, so the last position is always ignored."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of the positions whose *next* label is not ignored."""
    return next_token_targets(labels) != IGNORE_INDEX


def check_num_items(num_items_in_batch: int | torch.Tensor | None) -> None:
    # A tensor is not inspected: reading it would synchronise the device on every step.
    if isinstance(num_items_in_batch, Real) and num_items_in_batch < 0:
        raise ValueError(
            f"`num_items_in_batch` must be >= 0 (the number of valid tokens in the whole accumulated batch), "
            f"got {num_items_in_batch!r}."
        )


def token_normaliser(
    num_valid: int | torch.Tensor, num_items_in_batch: int | torch.Tensor | None, device, dtype
) -> torch.Tensor:
    """`1 / count`: the local valid-token count, or the Trainer's `num_items_in_batch`, clamped to at least 1 so
    that a batch without valid tokens yields a zero that keeps its gradient path."""
    count = num_valid if num_items_in_batch is None else num_items_in_batch
    count = torch.as_tensor(count, device=device, dtype=dtype).clamp_min(1)  # never divide by zero
    return count.reciprocal()
