"""Hidden-size (embedding channel) pruning: rank the channels of the residual stream by their activations at
every normalisation on calibration data, and remove the weakest from every weight that reads or writes it.

A channel's score is the sum, over every RMSNorm that normalises the residual stream (each block's norms and the
final norm), of the L2 norm over real tokens of that norm's output channel. L2 rather than a mean: it is the
aggregation the MLP-neuron and head scores use too, padding (left out) cannot dilute it, and a channel that is
large on a few tokens, which the residual stream carries to every later block, is not averaged away. Flattening
batch and sequence into one set of real tokens also makes the score independent of how the data is batched.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..base.anatomy import ONE_PLUS_WEIGHT_NORMS, decoder_layers, head_dim, residual_norms, sliced_linear
from .calibration import calibration_pass, check_calibration_data, masked_square_sum
from .targets import kept_fraction


def hidden_importance(
    model: nn.Module, data: Any, *, batch_size: int = 8, max_batches: int | None = None
) -> torch.Tensor:
    """Score every hidden channel on calibration `data` (see the module docstring); high means keep.

    Returns a float32 CPU tensor of shape `(hidden_size,)`.
    """
    check_calibration_data(data, "Hidden-size pruning")
    scores, _, _ = hidden_scores(model, data, batch_size, max_batches)
    return scores


def hidden_scores(
    model: nn.Module, data: Any, batch_size: int, max_batches: int | None
) -> tuple[torch.Tensor, int, int]:
    """`hidden_importance` on checked arguments, plus the calibration tokens and sequences seen."""
    norms = residual_norms(model)
    sums = [torch.zeros(model.config.hidden_size, dtype=torch.float64) for _ in norms]

    def register(valid: list[torch.Tensor]) -> list[Any]:
        def make_hook(k: int):
            def hook(module, args, output):
                sums[k] += masked_square_sum(output, valid[0])

            return hook

        return [norm.register_forward_hook(make_hook(k)) for k, norm in enumerate(norms)]

    tokens, sequences = calibration_pass(
        model, data, register, batch_size=batch_size, max_batches=max_batches, desc="Hidden activations"
    )
    return torch.stack(sums).sqrt().sum(0).float(), tokens, sequences


def target_hidden_size(hidden_size: int | float, current: int) -> int:
    """The hidden size kept: an int is the size itself (at most the current one), a float in (0, 1) the fraction."""
    fraction = kept_fraction("hidden_size", hidden_size, "hidden channels")
    size = hidden_size if fraction is None else math.floor(fraction * current + 1e-9)
    if not 1 <= size <= current:
        raise ValueError(
            f"hidden_size={hidden_size} keeps {size} of the {current} hidden channels; keep between 1 and {current}."
        )
    return size


def _sliced(weight: torch.Tensor, keep: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(weight.detach().index_select(dim, keep).clone(), requires_grad=weight.requires_grad)


def slice_hidden(model: nn.Module, keep: torch.Tensor) -> None:
    """Keep hidden channels `keep` everywhere: embedding, norms, every projection's hidden side, lm_head.

    New parameters replace the old ones (their tensors may be shared with another model). Gemma3 multiplies the
    embedding by `sqrt(hidden_size)`, a constant transformers recomputes from the config at load: the kept
    embedding columns are rescaled by `sqrt(old / new)` so that the block inputs do not change, and, when the
    lm_head shares the embedding, the final norm's `(1 + weight)` is divided by the same factor so that the logits
    do not change either.
    """
    config = model.config
    config.head_dim = head_dim(model)  # derived from hidden / heads in some architectures: pin it first
    old_size = config.hidden_size
    embed = model.model.embed_tokens
    keep = keep.to(embed.weight.device)
    lm_head = model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is embed.weight
    with torch.no_grad():
        for layer in decoder_layers(model):
            attention, mlp = layer.self_attn, layer.mlp
            for module, names in ((attention, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
                for name in names:
                    setattr(module, name, sliced_linear(getattr(module, name), columns=keep))
            attention.o_proj = sliced_linear(attention.o_proj, rows=keep)
            mlp.down_proj = sliced_linear(mlp.down_proj, rows=keep)
            if hasattr(layer, "hidden_size"):
                layer.hidden_size = len(keep)
        for norm in residual_norms(model):
            norm.weight = _sliced(norm.weight, keep, 0)
        embed.weight = _sliced(embed.weight, keep, 1)
        embed.embedding_dim = len(keep)
        scale = getattr(embed, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and len(keep) != old_size:
            ratio = math.sqrt(old_size / len(keep))
            embed.weight.mul_(ratio)
            embed.embed_scale = torch.tensor(len(keep) ** 0.5, dtype=scale.dtype, device=scale.device)
            if hasattr(embed, "scalar_embed_scale"):
                embed.scalar_embed_scale = len(keep) ** 0.5
            final = model.model.norm
            if tied and type(final).__name__ in ONE_PLUS_WEIGHT_NORMS:
                final.weight.copy_((1 + final.weight) / ratio - 1)
            elif tied:
                final.weight.div_(ratio)
        if lm_head is not None and tied:
            lm_head.weight = embed.weight
            lm_head.in_features = len(keep)
        elif lm_head is not None:
            model.set_output_embeddings(sliced_linear(lm_head, columns=keep))
    config.hidden_size = len(keep)
