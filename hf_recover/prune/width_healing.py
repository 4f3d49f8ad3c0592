"""Width pruning healed without training: after MLP neurons or attention heads are removed, the columns of
`down_proj` / `o_proj` that remain are refitted by least squares, so that the layer's output on calibration data is
as close as they allow to the unpruned layer's (as ZipLM, Kurtic et al. 2023, SlimGPT, Ling et al. 2024, and
OSSCAR, Meng et al. 2024, do with second-order variants).

For a layer `y = h·Wᵀ` whose inputs `h` lose the features outside `K`, with `G = Σ hᵀh` over the calibration tokens
(padding excluded), the refit is

    W_K' = argmin Σ |h·Wᵀ − h_K·W_K'ᵀ|² + λ·|W_K' − W_K|²   ⇒   W_K'ᵀ = (G_KK + λI)⁻¹ (G_K·Wᵀ + λ·W_Kᵀ)

solved in float64; `λ = ridge · mean(diag G_KK)` keeps rarely active features near their old weights. The removed
features' contribution is folded into the kept ones as far as their activations correlate: no parameter is added and
the model stays a plain model of its class. FLAP's bias compensation (An et al. 2024) would need bias parameters,
which Llama (unless `mlp_bias` / `attention_bias`), Qwen2 and Qwen3 MLPs do not have.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base.anatomy import decoder_layers
from .calibration import calibration_pass

DEFAULT_RIDGE = 1e-3


WIDTH_HEAL_METHODS = ("lstsq",)


def input_grams(
    model: nn.Module,
    data: Any,
    projections: dict[str, list[int]],
    *,
    batch_size: int,
    max_batches: int | None,
) -> tuple[dict[tuple[str, int], torch.Tensor], int, int]:
    """`G = Σ hᵀh` (float64) of the inputs of each `projection` (`"down_proj"`, `"o_proj"`) in its blocks, over the
    real tokens of one calibration pass; and how many tokens and sequences that was."""
    blocks = decoder_layers(model)
    layers = {(name, i): _projection(blocks[i], name) for name, indices in projections.items() for i in indices}
    grams = {
        key: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64) for key, layer in layers.items()
    }

    def register(valid: list[torch.Tensor]) -> list[Any]:
        def make_hook(key):
            def hook(module, args):
                h = args[0][valid[0].bool()].double().cpu()  # (real tokens, in_features)
                grams[key] += h.T @ h

            return hook

        return [layer.register_forward_pre_hook(make_hook(key)) for key, layer in layers.items()]

    tokens, sequences = calibration_pass(
        model, data, register, batch_size=batch_size, max_batches=max_batches, desc="Inputs to compensate"
    )
    return grams, tokens, sequences


def refit_columns(
    weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, *, ridge: float = DEFAULT_RIDGE
) -> torch.Tensor:
    """The columns `keep` of `weight` `(out, in)`, refitted to reproduce `h·weightᵀ` from `h[:, keep]` alone (see the
    module docstring); returned in `weight`'s dtype, shape `(out, len(keep))`."""
    w = weight.detach().double().cpu()
    keep = keep.cpu()
    g_kk = gram[keep][:, keep]
    strength = ridge * float(g_kk.diagonal().mean().clamp_min(1e-12))
    lhs = g_kk + strength * torch.eye(len(keep), dtype=torch.float64)
    rhs = gram[keep] @ w.T + strength * w[:, keep].T  # (K, out)
    return torch.linalg.solve(lhs, rhs).T.to(device=weight.device, dtype=weight.dtype).contiguous()


def _projection(block: nn.Module, projection: str) -> nn.Linear:
    if projection == "down_proj":
        return block.mlp.down_proj
    if projection == "o_proj":
        return block.self_attn.o_proj
    raise ValueError(f"projection must be 'down_proj' or 'o_proj', got {projection!r}.")
