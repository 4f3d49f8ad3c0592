"""Attention-head pruning: rank query heads by their output on calibration data and remove the weakest.

Grouped-query attention shares each key/value head among a group of query heads. We remove query heads *evenly
within every group* and keep every key/value head: the KV cache keeps its layout and size per token, rotary and
`q_norm`/`k_norm` (one weight of head size shared by all heads, in Qwen3 and Gemma3) are untouched, and only
`q_proj`'s rows and `o_proj`'s columns change. Removing whole KV groups would also shrink the cache, but it takes
the query heads of a group together whatever their own scores, and allows only multiples of the group size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..base.anatomy import attention_heads, decoder_layers, head_dim, head_rows, sliced_linear
from .calibration import calibration_pass, check_calibration_data, masked_square_sum
from .targets import kept_fraction

# Architectures whose config checks `hidden_size % num_attention_heads == 0` even when `head_dim` is explicit.
HIDDEN_DIVISIBLE_BY_HEADS = ("llama", "gemma3_text")


def head_importance(
    model: nn.Module,
    data: Any,
    *,
    layers: list[int] | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> dict[int, torch.Tensor]:
    """Score every query head of the given blocks (all by default) on calibration `data`; high means keep.

    A head's score is the L2 norm, over every real token of `data` (padding excluded), of its output: its
    `head_dim` slice of `o_proj`'s input, i.e. what the head contributes to the attention output before the
    output projection mixes the heads. Returns `{block index: float32 CPU tensor of shape (heads,)}`.
    """
    from .importance import check_layer_indices

    check_calibration_data(data, "Attention-head pruning")
    indices = check_layer_indices(layers, len(decoder_layers(model)), "layers")
    scores, _, _ = head_scores(model, data, indices, batch_size, max_batches)
    return scores


def head_scores(
    model: nn.Module, data: Any, layer_indices: list[int], batch_size: int, max_batches: int | None
) -> tuple[dict[int, torch.Tensor], int, int]:
    """`head_importance` on checked arguments, plus the calibration tokens and sequences seen."""
    blocks = decoder_layers(model)
    size = head_dim(model)
    heads = attention_heads(model)
    sums = {i: torch.zeros(heads[i], dtype=torch.float64) for i in layer_indices}

    def register(valid: list[torch.Tensor]) -> list[Any]:
        def make_hook(i: int):
            def hook(module, args):
                x = args[0]  # (B, T, heads * head_dim)
                sums[i] += masked_square_sum(x.reshape(*x.shape[:2], heads[i], size), valid[0]).sum(-1)

            return hook

        return [blocks[i].self_attn.o_proj.register_forward_pre_hook(make_hook(i)) for i in layer_indices]

    tokens, sequences = calibration_pass(
        model, data, register, batch_size=batch_size, max_batches=max_batches, desc="Head activations"
    )
    return {i: s.sqrt().float() for i, s in sums.items()}, tokens, sequences


def target_heads(heads: int | float, counts: list[int], kv_heads: int) -> list[int]:
    """The query heads each block keeps: an int is the count itself, a float in (0, 1) the fraction kept, rounded
    down to a multiple of the key/value heads (the same number of query heads leaves every group)."""
    fraction = kept_fraction("heads", heads, "query heads")
    if fraction is not None:
        targets = [math.floor(fraction * n / kv_heads + 1e-9) * kv_heads for n in counts]
        if min(targets) < kv_heads:
            raise ValueError(
                f"heads={heads} keeps no query head in some key/value group (blocks of {min(counts)} heads, "
                f"{kv_heads} KV heads); keep at least {kv_heads / min(counts):.3g} of them."
            )
        return targets
    if heads < 1 or heads % kv_heads:
        raise ValueError(
            f"heads={heads} breaks grouped-query attention: query heads are removed evenly within each of the "
            f"{kv_heads} key/value groups, so keep a positive multiple of {kv_heads}."
        )
    if heads > min(counts):
        raise ValueError(
            f"heads={heads} is more than the {min(counts)} query heads a block has; pruning only removes."
        )
    return [heads] * len(counts)


def heads_to_keep(score: torch.Tensor, kept: int, kv_heads: int) -> torch.Tensor:
    """The sorted indices of the `kept` heads to keep: the best `kept / kv_heads` of every KV group."""
    group = len(score) // kv_heads
    per_group = kept // kv_heads
    keep = []
    for g in range(kv_heads):
        best = torch.argsort(score[g * group : (g + 1) * group], descending=True, stable=True)[:per_group]
        keep.append(best + g * group)
    return torch.cat(keep).sort().values


def slice_heads(attention: nn.Module, keep: torch.Tensor, size: int, kv_heads: int) -> None:
    """Keep query heads `keep` of an attention module: their rows of `q_proj` (and bias), columns of `o_proj`.

    New modules replace the old ones (their tensors may be shared with another model).
    """
    rows = head_rows(keep.to(attention.q_proj.weight.device), size)
    attention.q_proj = sliced_linear(attention.q_proj, rows=rows)
    attention.o_proj = sliced_linear(attention.o_proj, columns=rows)
    attention.num_key_value_groups = len(keep) // kv_heads
