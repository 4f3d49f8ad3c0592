"""Width pruning at a given parameter count: the MLP size that, with the chosen heads and hidden size, brings a
model to (at most) a target number of parameters, e.g. the count of a depth-pruned student, so that depth and
width can be compared at equal size."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..base.anatomy import attention_heads, check_supported, head_dim, mlp_sizes, num_kv_heads
from ..base.evaluation import count_parameters
from .attention_heads import target_heads
from .hidden import target_hidden_size


def parameters_at(
    model: nn.Module,
    *,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    heads: int | None = None,
    intermediate_size: int | None = None,
) -> int:
    """The parameter count of `model`'s architecture with every block uniform at the given sizes (the model's own
    where None), counted on a model built on the meta device: no memory, no weights."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.head_dim = head_dim(model)
    for name, value in (
        ("num_hidden_layers", num_layers),
        ("hidden_size", hidden_size),
        ("num_attention_heads", heads),
        ("intermediate_size", intermediate_size),
    ):
        if value is not None:
            setattr(config, name, value)
    if num_layers is not None and getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)
    return count_parameters(built)


def width_spec_at_parameters(
    model: nn.Module,
    target_parameters: int,
    *,
    heads: int | float | None = None,
    hidden_size: int | float | None = None,
    divisor: int = 1,
    method: str = "activation",
    num_layers: int | None = None,
) -> dict[str, Any]:
    """A `prune_width` spec (`{"heads", "hidden_size", "expansion_rate", "divisor", "method"}`) whose student has
    at most `target_parameters` parameters, as close to it as the MLP size (a multiple of `divisor`) allows.

    `heads` and `hidden_size` are fixed as given (see `prune_width`); the MLP size then takes up the rest. Needs a
    model whose blocks are uniform (as a teacher is). `num_layers` counts the model as it will be after a depth
    pruning of it (a depth + width mix), its own block count by default. Raises `ValueError` when even the smallest
    MLP is too big or the MLP would have to grow.
    """
    check_supported(model)
    sizes, counts = mlp_sizes(model), attention_heads(model)
    if len(set(sizes)) > 1 or len(set(counts)) > 1:
        raise ValueError("width_spec_at_parameters needs uniform blocks (one MLP size, one head count).")
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"divisor must be an int >= 1, got {divisor!r}.")
    hidden = model.config.hidden_size
    kept_hidden = target_hidden_size(hidden_size, hidden) if hidden_size is not None else hidden
    kept_heads = target_heads(heads, counts[:1], num_kv_heads(model))[0] if heads is not None else counts[0]
    # the count is linear in the MLP size: two meta models give the slope and the intercept
    shape = {"num_layers": num_layers, "hidden_size": kept_hidden, "heads": kept_heads}
    smallest = parameters_at(model, **shape, intermediate_size=divisor)
    per_step = parameters_at(model, **shape, intermediate_size=2 * divisor) - smallest
    neurons = divisor + math.floor((target_parameters - smallest) / per_step + 1e-9) * divisor
    if neurons < divisor:
        raise ValueError(
            f"{target_parameters:,} parameters cannot be reached with hidden size {kept_hidden} and {kept_heads} "
            "heads even with the smallest MLP; prune the hidden size or the heads further."
        )
    if neurons > sizes[0]:
        raise ValueError(
            f"With hidden size {kept_hidden} and {kept_heads} heads the model already has fewer than "
            f"{target_parameters:,} parameters at its full MLP ({sizes[0]}); prune the hidden size or heads less."
        )
    spec: dict[str, Any] = {"method": method, "expansion_rate": neurons / hidden, "divisor": divisor}
    if heads is not None:
        spec["heads"] = heads
    if hidden_size is not None:
        spec["hidden_size"] = hidden_size
    return spec
