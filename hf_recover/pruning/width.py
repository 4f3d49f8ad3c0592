"""Width pruning: remove GLU MLP neurons (gate/up rows and down columns together). Models whose blocks ended
with different MLP sizes reload with `hf_recover.load_pruned` (in `hf_recover.loading`)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..pruned_config import PrunedConfig
from ._model import (
    base_pruned_config,
    check_supported,
    decoder_layers,
    describe_data,
    finish_pruning,
    mlp_sizes,
    new_linear,
)
from .importance import _check_neuron_args, _neuron_scores

WIDTH_METHODS = ("maw", "vow", "pon", "activation")


def prune_width(
    model: nn.Module,
    *,
    pruning_ratio: float | None = None,
    expansion_rate: float | None = None,
    divisor: int = 1,
    method: str = "maw",
    layers: list[int] | None = None,
    data: Any = None,
    inplace: bool = False,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> tuple[nn.Module, PrunedConfig]:
    """Remove the least important GLU MLP neurons of each block; return the model and its `PrunedConfig`.

    Give exactly one target size, applied to each block in `layers` (every block by default):
    - `pruning_ratio` in (0, 1): the fraction of the block's neurons to remove; the block keeps
      `floor(size * (1 - pruning_ratio) / divisor) * divisor` neurons;
    - `expansion_rate` > 0: the kept MLP size relative to the hidden size; the block keeps
      `floor(expansion_rate * hidden_size / divisor) * divisor` neurons (e.g. 2.0 with hidden 576 gives
      1152; SmolLM2's own MLP is 1536 = 2.67x). It may not exceed the block's current size.
    `divisor` rounds the kept size down to a multiple of it (e.g. 64 or 128 for fast kernels).
    Neurons are ranked by `method` (see `neuron_importance`: `"maw"`, `"vow"`, `"pon"`, or
    `"activation"`, which needs calibration `data`). Kept neurons keep their order.

    Blocks may end with different MLP sizes (with `layers=`, or when the model was width-pruned
    before). Equal sizes are written to `config.intermediate_size`, so plain `from_pretrained` reloads
    the model; different ones need `hf_recover.load_pruned` (see there).
    """
    check_supported(model)
    blocks = decoder_layers(model)
    layer_indices = _check_neuron_args(model, method, data, layers)
    targets = target_sizes(
        [mlp_sizes(model)[i] for i in layer_indices],
        model.config.hidden_size,
        pruning_ratio=pruning_ratio,
        expansion_rate=expansion_rate,
        divisor=divisor,
    )
    scores, tokens, sequences = _neuron_scores(model, method, data, layer_indices, batch_size, max_batches)

    teacher = base_pruned_config(model)
    previous = PrunedConfig.find_for(model)
    if not inplace:
        model = copy.deepcopy(model)
        blocks = decoder_layers(model)
    summary = []
    for i, size in zip(layer_indices, targets):
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
        slice_mlp(blocks[i].mlp, keep)
    step = {
        "type": "width",
        "method": method,
        "pruning_ratio": pruning_ratio,
        "expansion_rate": expansion_rate,
        "divisor": divisor,
        "layers": layer_indices,
        "scores": summary,
    }
    description = describe_data(data, tokens, sequences) if method == "activation" else None
    kept = list(range(len(blocks)))
    pruned_config = finish_pruning(model, teacher, previous, kept_layer_indices=kept, step=step, data=description)
    return model, pruned_config


def target_sizes(
    sizes: list[int],
    hidden_size: int,
    *,
    pruning_ratio: float | None,
    expansion_rate: float | None,
    divisor: int = 1,
) -> list[int]:
    """The MLP size each block keeps (see `prune_width`); raises `ValueError` on impossible targets."""
    if (pruning_ratio is None) == (expansion_rate is None):
        raise ValueError(
            "Give exactly one of pruning_ratio= (fraction removed) or expansion_rate= (kept size / hidden)."
        )
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"divisor must be an int >= 1, got {divisor!r}.")
    # a tiny epsilon so that 0.7 * 100 (= 69.99999999999999) rounds to 70, as intended
    if pruning_ratio is not None:
        if not (isinstance(pruning_ratio, int | float) and 0 < pruning_ratio < 1):
            raise ValueError(
                f"pruning_ratio is the fraction of neurons removed and must be in (0, 1), got {pruning_ratio!r}."
            )
        targets = [math.floor(size * (1 - pruning_ratio) / divisor + 1e-9) * divisor for size in sizes]
    else:
        if not (isinstance(expansion_rate, int | float) and expansion_rate > 0):
            raise ValueError(f"expansion_rate must be > 0, got {expansion_rate!r}.")
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
    keep = keep.to(mlp.up_proj.weight.device)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = new_linear(old.in_features, len(keep), old)
            new.weight.copy_(old.weight[keep])
            if old.bias is not None:
                new.bias.copy_(old.bias[keep])
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = new_linear(len(keep), old.out_features, old)
        new.weight.copy_(old.weight[:, keep])
        if old.bias is not None:
            new.bias.copy_(old.bias)
        mlp.down_proj = new
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)
