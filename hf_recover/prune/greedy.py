"""Greedy block removal: drop one block at a time, each time the one whose removal moves the model's next-token
distribution least (forward KL to the unpruned model on calibration data), re-scored after every removal.

One-shot scores (block influence, angular distance) rank every block against the full model, so they miss how
removals interact: two neighbouring blocks may each be harmless alone and costly together. Re-scoring after each
removal sees the interaction, at the price of `n × blocks` calibration forwards instead of one: give it a few
calibration batches (`max_batches`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..base.anatomy import PER_LAYER_CONFIG_FIELDS, decoder_layers, model_device
from ..base.constants import IGNORE_INDEX
from ..base.data import iter_batches, num_batches
from ..base.losses import forward_kl


@contextlib.contextmanager
def only_blocks(model: nn.Module, kept: list[int]) -> Iterator[nn.Module]:
    """Run `model` with only blocks `kept` for the duration of the block (no copy: the block list and the per-block
    config entries are swapped and restored). Forwards must pass `use_cache=False`: block indices are not
    renumbered."""
    config, layers = model.config, decoder_layers(model)
    names = ("num_hidden_layers", *PER_LAYER_CONFIG_FIELDS)
    saved = {name: getattr(config, name) for name in names if hasattr(config, name)}
    try:
        model.model.layers = nn.ModuleList([layers[i] for i in kept])
        config.num_hidden_layers = len(kept)
        for name in PER_LAYER_CONFIG_FIELDS:
            values = saved.get(name)
            if isinstance(values, list | tuple) and len(values) == len(layers):
                setattr(config, name, [values[i] for i in kept])
        yield model
    finally:
        model.model.layers = layers
        for name, value in saved.items():
            setattr(config, name, value)


@torch.inference_mode()
def greedy_block_removal(
    model: nn.Module, data: Any, n: int, *, batch_size: int = 8, max_batches: int | None = None
) -> tuple[list[int], list[float], int, int]:
    """The `n` blocks to remove, chosen one at a time by KL to `model` on `data` after the blocks already chosen.

    Returns `(removed, kl, tokens, sequences)`: the removed block indices (sorted), the mean KL per token
    (teacher ‖ pruned) after each removal, in removal order, and the calibration tokens and sequences seen.
    The first and last blocks are candidates like the others. Padding is left out of the KL.
    """
    n_layers = len(decoder_layers(model))
    device = model_device(model)
    was_training = model.training
    model.eval()
    kept, path = list(range(n_layers)), []
    tokens = sequences = 0
    try:
        for step in range(n):
            totals = dict.fromkeys(kept, 0.0)
            tokens = sequences = 0
            batches = iter_batches(
                data, batch_size=batch_size, max_batches=max_batches, device=device,
                columns=("input_ids", "attention_mask"),
            )  # fmt: skip
            total = num_batches(data, batch_size=batch_size, max_batches=max_batches)
            for batch in tqdm(batches, total=total, desc=f"Greedy block removal {step + 1}/{n}", leave=False):
                ids = batch["input_ids"]
                mask = batch.get("attention_mask", torch.ones_like(ids))
                labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
                reference = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                for block in kept:
                    with only_blocks(model, [k for k in kept if k != block]):
                        candidate = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    # summed over the valid next-token positions (num_items_in_batch=1), as the evaluation loop does
                    totals[block] += forward_kl(candidate, reference, labels, num_items_in_batch=1).item()
                tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
                sequences += ids.shape[0]
            if tokens == 0:
                raise ValueError("The calibration data has no real token (attention_mask is all 0): nothing to score.")
            best = min(kept, key=lambda block: (totals[block], block))  # the lower index on ties
            kept.remove(best)
            path.append((best, totals[best] / tokens))
    finally:
        model.train(was_training)
    return sorted(block for block, _ in path), [kl for _, kl in path], tokens, sequences
