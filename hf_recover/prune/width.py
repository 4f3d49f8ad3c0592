"""Width pruning: remove GLU MLP neurons (gate/up rows and down columns together), attention heads (see
`heads`) and hidden channels (see `hidden`). Models whose blocks ended with different MLP sizes or head counts
reload with `hf_recover.load_pruned` (in `hf_recover.base.loading`)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..base.anatomy import (
    attention_heads,
    check_supported,
    decoder_layers,
    head_dim,
    head_rows,
    mlp_sizes,
    num_kv_heads,
    sliced_linear,
)
from ..base.pruned_config import PrunedConfig
from .attention_heads import HIDDEN_DIVISIBLE_BY_HEADS, head_scores, heads_to_keep, slice_heads, target_heads
from .calibration import check_calibration_data
from .healing import HealSpec, calibration_perplexity
from .hidden import hidden_scores, slice_hidden, target_hidden_size
from .importance import _check_neuron_args, _neuron_scores
from .record import base_pruned_config, describe_data, finish_pruning
from .rotation import check_rotatable, fold_norms, residual_principal_axes, rotate_and_slice
from .width_healing import input_grams, refit_columns

WIDTH_METHODS = ("maw", "vow", "pon", "activation")
HIDDEN_METHODS = ("slice", "rotate")


def prune_width(
    model: nn.Module,
    *,
    pruning_ratio: float | None = None,
    expansion_rate: float | None = None,
    divisor: int = 1,
    method: str = "maw",
    heads: int | float | None = None,
    hidden_size: int | float | None = None,
    layers: list[int] | None = None,
    data: Any = None,
    inplace: bool = False,
    batch_size: int = 8,
    max_batches: int | None = None,
    heal: str | HealSpec | None = None,
    hidden_method: str = "slice",
) -> tuple[nn.Module, PrunedConfig]:
    """Remove the least important GLU MLP neurons, attention heads and/or hidden channels; return the model and
    its `PrunedConfig`.

    MLP neurons: give at most one target size, applied to each block in `layers` (every block by default):
    - `pruning_ratio` in (0, 1): the fraction of the block's neurons to remove; the block keeps
      `floor(size * (1 - pruning_ratio) / divisor) * divisor` neurons;
    - `expansion_rate` > 0: the kept MLP size relative to the hidden size; the block keeps
      `floor(expansion_rate * hidden_size / divisor) * divisor` neurons (e.g. 2.0 with hidden 576 gives
      1152; SmolLM2's own MLP is 1536 = 2.67x). It may not exceed the block's current size.
    `divisor` rounds the kept size down to a multiple of it (e.g. 64 or 128 for fast kernels).
    Neurons are ranked by `method` (see `neuron_importance`: `"maw"`, `"vow"`, `"pon"`, or
    `"activation"`, which needs calibration `data`). Kept neurons keep their order.

    Attention heads, `heads=`: the query heads each block in `layers` keeps, as a count (an int, a multiple of the
    key/value heads) or as the fraction kept (a float in (0, 1), rounded down to such a multiple). Query heads are
    removed evenly within every key/value group, so every KV head and the KV cache layout stay (see
    `hf_recover.prune.attention_heads`); they are ranked by the L2 norm of their output on calibration `data`.

    Hidden size, `hidden_size=`: the width of the residual stream kept, as a size (an int) or the fraction kept (a
    float in (0, 1)), for the whole model (embedding, every block, final norm, lm_head); channels are ranked by
    their activations at every norm on calibration `data` (see `hf_recover.prune.hidden`). `expansion_rate`
    stays relative to the hidden size before pruning. Llama and Gemma3 configs require the hidden size to be a
    multiple of the number of heads. `hidden_method="rotate"` rotates the residual stream into its principal axes
    on calibration `data` before deleting the least used directions, instead of slicing channels (SliceGPT; see
    `hf_recover.prune.rotation`: exact up to the deletion, it unties a tied lm_head, and refuses Gemma3).

    Every score is computed on the model before any of it is pruned (one calibration pass per axis), then the
    axes are pruned together. Give at least one of the MLP target, `heads`, `hidden_size`.

    `heal="lstsq"` (or `HealSpec("lstsq")`: the heal type and word depth pruning uses) compensates the removed MLP
    neurons and heads without training: the remaining columns of each pruned block's `down_proj` / `o_proj` are
    refitted by least squares to reproduce the unpruned layer's output on calibration `data` (see
    `hf_recover.prune.width_healing`). The step in the `PrunedConfig` records it, with the perplexity on the
    calibration tokens before and after.

    Blocks may end with different MLP sizes (with `layers=`, or when the model was width-pruned
    before). Equal sizes are written to `config.intermediate_size`, so plain `from_pretrained` reloads
    the model; different ones need `hf_recover.load_pruned` (see there); the same holds for head counts.
    """
    from .spec import WidthSpec  # the rules of a width part have one home: the spec checks its own values

    check_supported(model)
    spec = WidthSpec(
        method=method, pruning_ratio=pruning_ratio, expansion_rate=expansion_rate, divisor=divisor, layers=layers,
        heads=heads, hidden_size=hidden_size, hidden_method=hidden_method, heal=heal,
    )  # fmt: skip
    prune_mlp, heal = spec.prunes_mlp, spec.heal.method if spec.heal is not None else None
    blocks = decoder_layers(model)
    layer_indices = _check_neuron_args(model, method, data, layers)
    if heal is not None and data is None:
        raise ValueError(f"heal={heal!r} refits the remaining columns on calibration activations: pass data= as well.")
    if hidden_size is not None and hidden_method == "rotate":
        check_rotatable(model)
    targets = (
        target_sizes(
            [mlp_sizes(model)[i] for i in layer_indices],
            model.config.hidden_size,
            pruning_ratio=pruning_ratio,
            expansion_rate=expansion_rate,
            divisor=divisor,
        )
        if prune_mlp
        else []
    )
    head_targets, hidden_target = plan_heads_and_hidden(model, heads, hidden_size, layer_indices, data)

    tokens = sequences = 0
    channel_scores = axes = variances = grams = None
    if prune_mlp:
        scores, tokens, sequences = _neuron_scores(model, method, data, layer_indices, batch_size, max_batches)
    if heads is not None:
        scores_of_heads, tokens, sequences = head_scores(model, data, layer_indices, batch_size, max_batches)
    if hidden_size is not None and hidden_method == "slice":
        channel_scores, tokens, sequences = hidden_scores(model, data, batch_size, max_batches)
    elif hidden_size is not None:
        axes, variances, tokens, sequences = residual_principal_axes(
            model, data, batch_size=batch_size, max_batches=max_batches
        )
    if heal is not None:  # the unpruned layers' inputs, for the refit
        projections = {"down_proj": layer_indices if prune_mlp else [], "o_proj": layer_indices if heads else []}
        grams, tokens, sequences = input_grams(
            model, data, projections, batch_size=batch_size, max_batches=max_batches
        )

    teacher = base_pruned_config(model)
    previous = PrunedConfig.find_for(model)
    if not inplace:
        model = copy.deepcopy(model)
        blocks = decoder_layers(model)
    refits = []  # (linear's owner, attribute, unpruned weight, gram, kept columns), for the heal
    step = {"type": "width", "method": method if prune_mlp else None}
    if prune_mlp:
        step.update(pruning_ratio=pruning_ratio, expansion_rate=expansion_rate, divisor=divisor)
    summary = _cut_mlp(blocks, dict(zip(layer_indices, targets)), scores, grams, refits) if prune_mlp else []
    step.update(layers=layer_indices, scores=summary)
    if heads is not None:
        kept_heads = _cut_heads(model, blocks, dict(zip(layer_indices, head_targets)), scores_of_heads, grams, refits)
        step.update(heads=heads, kept_heads={str(i): k for i, k in kept_heads.items()})
    if heal is not None:  # before any hidden-size cut: the refit solves for the unpruned weights' output rows
        step["heal"] = compensate(model, refits, heal, data, tokens, batch_size, max_batches)
        if hidden_size is not None:
            step["heal"]["measured"] = "before the hidden-size cut"
    if hidden_size is not None:
        step.update(hidden_size=hidden_size, **_cut_hidden(model, hidden_target, channel_scores, axes, variances))
    description = describe_data(data, tokens, sequences) if spec.needs_calibration else None
    kept = list(range(len(blocks)))
    pruned_config = finish_pruning(model, teacher, previous, kept_layer_indices=kept, step=step, data=description)
    return model, pruned_config


def _cut_mlp(blocks, sizes: dict[int, int], scores, grams, refits: list) -> list[dict]:
    """Keep the `sizes[i]` best-scored MLP neurons of block `i`; the summary of each cut (for the `PrunedConfig`).
    With `grams` (a heal), each pruned `down_proj` is queued in `refits`."""
    summary = []
    for i, size in sizes.items():
        score = scores[i]
        keep = torch.argsort(score, descending=True, stable=True)[:size].sort().values
        dropped = torch.ones_like(score, dtype=torch.bool)
        dropped[keep] = False
        summary.append(
            {
                "layer": i,
                "kept": size,
                "removed": int(dropped.sum()),
                "kept_score_mean": round(float(score[keep].mean()), 6),
                "removed_score_mean": round(float(score[dropped].mean()), 6) if dropped.any() else None,
            }
        )
        if grams is not None:
            refits.append((blocks[i].mlp, "down_proj", blocks[i].mlp.down_proj.weight, grams["down_proj", i], keep))
        slice_mlp(blocks[i].mlp, keep)
    return summary


def _cut_heads(model, blocks, counts: dict[int, int], scores, grams, refits: list) -> dict[int, list[int]]:
    """Keep the `counts[i]` best-scored query heads of block `i`, evenly within its key/value groups; the heads kept
    per block. With `grams` (a heal), each pruned `o_proj` is queued in `refits`."""
    kv_heads, size = num_kv_heads(model), head_dim(model)
    kept_heads = {}
    for i, kept in counts.items():
        keep = heads_to_keep(scores[i], kept, kv_heads)
        if grams is not None:
            attention = blocks[i].self_attn
            refits.append((attention, "o_proj", attention.o_proj.weight, grams["o_proj", i], head_rows(keep, size)))
        slice_heads(blocks[i].self_attn, keep, size, kv_heads)
        kept_heads[i] = keep.tolist()
    return kept_heads


def _cut_hidden(model, size: int, channel_scores, axes, variances) -> dict:
    """Keep `size` channels of the residual stream: the best-scored ones (`channel_scores`), or its first principal
    `axes` (rotated into them first); what the step records of a rotation."""
    if channel_scores is not None:
        slice_hidden(model, torch.argsort(channel_scores, descending=True, stable=True)[:size].sort().values)
        return {}
    untied = fold_norms(model)
    rotate_and_slice(model, axes, size)
    kept_variance = round(float(variances[:size].sum() / variances.sum()), 6)
    return {"hidden_method": "rotate", "untied_lm_head": untied, "kept_variance": kept_variance}


def compensate(model, refits, heal: str, data, tokens: int, batch_size: int, max_batches: int | None) -> dict:
    """Refit the pruned columns (`refits` from `prune_width`); the record of the heal for `PrunedConfig`."""
    before = calibration_perplexity(model, data, batch_size, max_batches)
    with torch.no_grad():
        for owner, name, unpruned, gram, kept in refits:
            getattr(owner, name).weight.copy_(refit_columns(unpruned, gram, kept))
    after = calibration_perplexity(model, data, batch_size, max_batches)
    return {
        "method": heal,
        "refitted": sorted({name for _, name, *_ in refits}),
        "calibration_tokens": tokens,
        "fit_on": "teacher",
        "calibration_perplexity": {"before": round(before, 4), "after": round(after, 4)},
    }


def plan_heads_and_hidden(
    model: nn.Module,
    heads: int | float | None,
    hidden_size: int | float | None,
    layer_indices: list[int],
    data: Any,
    head_counts: list[int] | None = None,
) -> tuple[list[int], int | None]:
    """The head counts of the blocks in `layer_indices` and the hidden size to keep; raises before any work.

    `head_counts`: the query heads of every block that `layer_indices` refers to (the model's own by default; a
    candidate spec passes those left after its depth step)."""
    if heads is None and hidden_size is None:
        return [], None
    check_calibration_data(data, "Attention-head pruning" if heads is not None else "Hidden-size pruning")
    counts = list(attention_heads(model) if head_counts is None else head_counts)
    head_targets = (
        target_heads(heads, [counts[i] for i in layer_indices], num_kv_heads(model)) if heads is not None else []
    )
    current = model.config.hidden_size
    hidden_target = target_hidden_size(hidden_size, current) if hidden_size is not None else current
    for i, kept in zip(layer_indices, head_targets):
        counts[i] = kept
    if model.config.model_type in HIDDEN_DIVISIBLE_BY_HEADS and hidden_target % max(counts):
        raise ValueError(
            f"{model.config.model_type} configs require the hidden size to be a multiple of num_attention_heads: "
            f"a hidden size of {hidden_target} with {max(counts)} heads (the most any block keeps) would not reload. "
            "Choose a hidden size that is a multiple of the head count, or another head count."
        )
    return head_targets, (hidden_target if hidden_size is not None else None)


def check_width_options(
    *,
    prune_mlp: bool,
    heads: int | float | None,
    hidden_size: int | float | None,
    hidden_method: str,
    heal: str | None,
) -> None:
    """Refuse the options a width step could not apply, rather than record them as done: a rotation with no
    hidden-size cut, a heal with no MLP neuron or head removed to refit for."""
    if hidden_method == "rotate" and hidden_size is None:
        raise ValueError(
            "hidden_method='rotate' rotates the residual stream before cutting the hidden size, and no hidden_size "
            "is given: nothing would be rotated. Give hidden_size= too (hidden:S:rotate), or drop hidden_method."
        )
    if heal is not None and not prune_mlp and heads is None:
        raise ValueError(
            f"heal={heal!r} refits the down_proj / o_proj columns left after MLP neurons or attention heads are "
            f"removed, and this step removes neither (only the hidden size, hidden_size={hidden_size!r}): nothing "
            "would be refitted. Drop heal=, or prune neurons (pruning_ratio=) or heads (heads=) as well."
        )


def check_mlp_target(pruning_ratio: float | None, expansion_rate: float | None, divisor: int = 1) -> None:
    """The model-free checks of an MLP target: exactly one of ratio and rate, each in range, a positive divisor."""
    if (pruning_ratio is None) == (expansion_rate is None):
        raise ValueError(
            "Give exactly one of pruning_ratio= (fraction removed) or expansion_rate= (kept size / hidden) for the "
            "MLP (or neither, with heads= and/or hidden_size=)."
        )
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"divisor must be an int >= 1, got {divisor!r}.")
    if pruning_ratio is not None and not (
        isinstance(pruning_ratio, int | float) and not isinstance(pruning_ratio, bool) and 0 < pruning_ratio < 1
    ):
        raise ValueError(
            f"pruning_ratio is the fraction of neurons removed and must be in (0, 1), got {pruning_ratio!r}."
        )
    if expansion_rate is not None and not (
        isinstance(expansion_rate, int | float) and not isinstance(expansion_rate, bool) and expansion_rate > 0
    ):
        raise ValueError(f"expansion_rate must be > 0, got {expansion_rate!r}.")


def target_sizes(
    sizes: list[int],
    hidden_size: int,
    *,
    pruning_ratio: float | None,
    expansion_rate: float | None,
    divisor: int = 1,
) -> list[int]:
    """The MLP size each block keeps (see `prune_width`); raises `ValueError` on impossible targets."""
    check_mlp_target(pruning_ratio, expansion_rate, divisor)
    # a tiny epsilon so that 0.7 * 100 (= 69.99999999999999) rounds to 70, as intended
    if pruning_ratio is not None:
        targets = [math.floor(size * (1 - pruning_ratio) / divisor + 1e-9) * divisor for size in sizes]
    else:
        target = math.floor(expansion_rate * hidden_size / divisor + 1e-9) * divisor
        too_big = [size for size in sizes if target > size]
        if too_big:
            raise ValueError(
                f"expansion_rate={expansion_rate} asks for {target} neurons per block, more than the {min(too_big)} "
                "a block has; width pruning only removes neurons. Use a smaller expansion_rate."
            )
        targets = [target] * len(sizes)
    if min(targets) < 1:
        setting = f"pruning_ratio={pruning_ratio}" if pruning_ratio is not None else f"expansion_rate={expansion_rate}"
        raise ValueError(
            f"{setting} with divisor={divisor} leaves a block with {min(targets)} neurons; keep at least one "
            "(a smaller pruning_ratio, a larger expansion_rate or a smaller divisor)."
        )
    return targets


def slice_mlp(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep neurons `keep` of a GLU MLP: rows of gate/up (and their biases), columns of down.

    New modules replace the old ones: their tensors may be shared with another model.
    """
    mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=keep)
    mlp.up_proj = sliced_linear(mlp.up_proj, rows=keep)
    mlp.down_proj = sliced_linear(mlp.down_proj, columns=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)
