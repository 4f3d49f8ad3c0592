"""A smaller hidden size by rotation (SliceGPT, Ashkboos et al., "SliceGPT: Compress Large Language Models by
Deleting Rows and Columns", 2024), the alternative to slicing channels (`hf_recover.prune.hidden`).

An RMSNorm network is invariant to an orthogonal rotation `Q` of its residual stream once every norm's scale is
folded into the Linear layers that read the norm's output: `RMSNorm(x·Q) = RMSNorm(x)·Q` when the norm has no scale
of its own. So, with the norms folded,

- the embedding becomes `E·Q`, every layer that reads the residual stream (`q/k/v_proj`, `gate/up_proj`, the
  lm_head) `W·Q`, every layer that writes into it (`o_proj`, `down_proj`) `Qᵀ·W`,

and the rotated model computes the same function. With `Q` the principal axes of the residual stream on calibration
data (the eigenvectors of the covariance of what the norms normalise), deleting its last columns deletes the
directions the model uses least: the hidden size shrinks with the least damage. The norms' scale becomes
`sqrt(hidden / kept)`, which keeps their output's size when the deleted directions carried no energy.

One rotation serves every block (SliceGPT rotates each block differently and adds the change of basis to each
residual connection, which is a new parameter; here the student stays a plain model of its class). A model whose
lm_head shares the embedding (tied) cannot fold the final norm's scale into the lm_head without also scaling the
input embedding, so its lm_head is untied: exact, at the cost of a `vocabulary × hidden` matrix of its own.
Gemma3 is refused: it normalises each sub-layer's output before adding it to the residual stream (its post-attention
and post-feedforward norms), and a rotation cannot pass through a norm whose output is added to the stream.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..base.anatomy import decoder_layers, has_norm_after_mlp, head_dim, new_linear, residual_norms
from .calibration import calibration_pass

READERS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
WRITERS = {"self_attn": ("o_proj",), "mlp": ("down_proj",)}
NORM_READERS = {"input_layernorm": "self_attn", "post_attention_layernorm": "mlp"}
"""Which sub-layer reads each block norm's output."""


def check_rotatable(model: nn.Module) -> None:
    """Refuse a model whose residual stream a rotation cannot pass through exactly (see the module docstring)."""
    if has_norm_after_mlp(model):
        raise ValueError(
            f"Rotating the hidden size is not exact for {model.config.model_type}: it normalises each sub-layer's "
            "output before adding it to the residual stream (post-attention / post-feedforward norms), and a rotation "
            "cannot pass through those. Slice channels instead (the default hidden_method='slice')."
        )
    for i, block in enumerate(decoder_layers(model)):
        missing = [name for name in NORM_READERS if getattr(block, name, None) is None]
        if missing:
            raise ValueError(f"Block {i} has no {missing}: rotation folds each block's two norms into their readers.")


def residual_principal_axes(
    model: nn.Module, data: Any, *, batch_size: int = 8, max_batches: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """`(Q, eigenvalues, tokens, sequences)`: the eigenvectors (columns, float64, largest eigenvalue first) of the
    covariance of the RMS-normalised residual stream at every norm's input, over the real calibration tokens."""
    norms = residual_norms(model)
    size = model.config.hidden_size
    covariance = torch.zeros(size, size, dtype=torch.float64)

    def register(valid: list[torch.Tensor]) -> list[Any]:
        def hook(module, args):
            x = args[0][valid[0].bool()].double()  # (real tokens, hidden)
            x = x / x.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-12)  # what the norm normalises
            covariance.add_((x.T @ x).cpu())

        return [norm.register_forward_pre_hook(hook) for norm in norms]

    tokens, sequences = calibration_pass(
        model, data, register, batch_size=batch_size, max_batches=max_batches, desc="Residual stream"
    )
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    return vectors.flip(-1), values.flip(-1), tokens, sequences


@torch.no_grad()
def fold_norms(model: nn.Module) -> bool:
    """Fold every residual norm's scale into the Linear layers that read its output, leaving the norms' weights 1;
    untie a tied lm_head to take the final norm's scale. Returns whether the lm_head was untied."""
    for block in decoder_layers(model):
        for norm_name, owner_name in NORM_READERS.items():
            norm, owner = getattr(block, norm_name), getattr(block, owner_name)
            for name in READERS[owner_name]:
                linear = getattr(owner, name)
                linear.weight.mul_(norm.weight.to(linear.weight.dtype))
            norm.weight.fill_(1.0)
    final = model.model.norm
    head = model.get_output_embeddings()
    untie = head.weight is model.model.embed_tokens.weight
    if untie:
        untied = new_linear(head.in_features, head.out_features, head)
        untied.weight.copy_(head.weight)
        model.set_output_embeddings(untied)
        model.config.tie_word_embeddings = False
        head = untied
    head.weight.mul_(final.weight.to(head.weight.dtype))
    final.weight.fill_(1.0)
    return untie


@torch.no_grad()
def rotate_and_slice(model: nn.Module, axes: torch.Tensor, kept: int) -> None:
    """Rotate the residual stream of a model whose norms are folded into the first `kept` principal `axes` and
    delete the others (see the module docstring). New parameters replace the old ones."""
    config = model.config
    config.head_dim = head_dim(model)  # derived from hidden / heads in some architectures: pin it first
    size = config.hidden_size
    basis = axes[:, :kept]  # (hidden, kept)

    def rotated(weight: torch.Tensor, side: str) -> nn.Parameter:
        q = basis.to(device=weight.device, dtype=torch.float64)
        value = weight.double() @ q if side == "in" else q.T @ weight.double()
        return nn.Parameter(value.to(weight.dtype).contiguous(), requires_grad=weight.requires_grad)

    for block in decoder_layers(model):
        for owner_name, names in READERS.items():
            for name in names:
                linear = getattr(getattr(block, owner_name), name)
                linear.weight, linear.in_features = rotated(linear.weight, "in"), kept
        for owner_name, names in WRITERS.items():
            for name in names:
                linear = getattr(getattr(block, owner_name), name)
                linear.weight, linear.out_features = rotated(linear.weight, "out"), kept
                if linear.bias is not None:
                    bias = rotated(linear.bias.detach()[:, None], "out")
                    linear.bias = nn.Parameter(bias.detach()[:, 0].clone(), requires_grad=linear.bias.requires_grad)
        if hasattr(block, "hidden_size"):
            block.hidden_size = kept
    scale = math.sqrt(size / kept)  # the norms' mean square is now over `kept` directions
    for norm in residual_norms(model):
        norm.weight = nn.Parameter(torch.full((kept,), scale, dtype=norm.weight.dtype, device=norm.weight.device))
    embed = model.model.embed_tokens
    embed.weight = rotated(embed.weight, "in")
    embed.embedding_dim = kept
    head = model.get_output_embeddings()
    head.weight, head.in_features = rotated(head.weight, "in"), kept
    config.hidden_size = kept
