"""Model anatomy: where a Hugging Face decoder-only model keeps its blocks, norms, MLP and attention projections,
which config fields hold one entry per block, and how a Linear layer is sliced or rebuilt at another size.

Pruning, healing and loading all read a model through these functions, so that the architectures hf_recover
supports (`SUPPORTED_ARCHITECTURES`) are described in one place.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .constants import ATTENTION_HEADS_FIELD, MLP_SIZES_FIELD, SUPPORTED_ARCHITECTURES

PER_LAYER_CONFIG_FIELDS = ("layer_types", "mlp_layer_types", "no_rope_layers", MLP_SIZES_FIELD, ATTENTION_HEADS_FIELD)
"""Config fields holding one entry per block; sliced by the kept block indices when blocks are removed."""

GLU_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

ONE_PLUS_WEIGHT_NORMS = ("Gemma3RMSNorm",)
"""Norms that compute `x / rms(x) * (1 + weight)` (Gemma); the others compute `x / rms(x) * weight`."""


def accepts(model: nn.Module | None, argument: str) -> bool:
    """Whether the model's forward takes `argument`."""
    if model is None:
        return False
    forward = getattr(model, "_original_forward", model.forward)  # accelerate may wrap forward for autocast
    return argument in inspect.signature(forward).parameters


def check_supported(model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"Pruning supports model_type in {list(SUPPORTED_ARCHITECTURES)}, got {model_type!r}. "
            "Other architectures name or wire their per-layer settings differently and are not tested."
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, `model.model.layers` for every supported architecture."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no `model.layers` block list; pass a *ForCausalLM model of a supported "
            f"architecture ({list(SUPPORTED_ARCHITECTURES)})."
        )
    return layers


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_glu_mlp(layer: nn.Module, index: int) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    missing = [name for name in GLU_PROJECTIONS if not isinstance(getattr(mlp, name, None), nn.Linear)]
    if missing:
        raise ValueError(
            f"Block {index} has no GLU MLP (missing {missing} as nn.Linear): width pruning removes gate/up rows and "
            "down columns together, so it needs `mlp.gate_proj`, `mlp.up_proj` and `mlp.down_proj`."
        )
    return mlp


def residual_norms(model: nn.Module) -> list[nn.Module]:
    """Every norm over the hidden size: each block's own norms (not `q_norm`/`k_norm`, which normalise one head),
    then the final norm."""
    norms = [
        child
        for layer in decoder_layers(model)
        for child in layer.children()
        if type(child).__name__.endswith("RMSNorm")
    ]
    return [*norms, model.model.norm]


def has_norm_after_mlp(model: nn.Module) -> bool:
    """Whether a norm sits between each block's `down_proj` and the residual stream (Gemma3's post-feedforward
    norm): then the MLP's output is not added to the stream as it is."""
    return getattr(decoder_layers(model)[0], "post_feedforward_layernorm", None) is not None


# -- sizes: read from the weights, written to the config ------------------------------------------------------


def mlp_sizes(model: nn.Module) -> list[int]:
    """The MLP (intermediate) size of every block, read from the weights."""
    sizes = []
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        up = getattr(mlp, "up_proj", None)
        sizes.append(up.out_features if isinstance(up, nn.Linear) else int(model.config.intermediate_size))
    return sizes


def head_dim(model: nn.Module) -> int:
    """The size of one attention head: `config.head_dim` where set, else hidden / heads, as transformers has it."""
    config = model.config
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def num_kv_heads(model: nn.Module) -> int:
    return int(getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads)


def attention_heads(model: nn.Module) -> list[int]:
    """The number of query heads of every block, read from the weights (`q_proj` rows / head size)."""
    size = head_dim(model)
    return [layer.self_attn.q_proj.out_features // size for layer in decoder_layers(model)]


def sync_sizes(model: nn.Module) -> None:
    """Write the per-block MLP sizes and query-head counts into the config, so that `save_pretrained` describes the
    weights.

    The head size is written explicitly first: several architectures derive it from hidden / heads, which pruning
    heads or the hidden size would change. Equal values go to `intermediate_size` / `num_attention_heads` (plain
    `from_pretrained` works); different ones also go to `MLP_SIZES_FIELD` / `ATTENTION_HEADS_FIELD` (the shared
    field then holds the largest value), which `hf_recover.load_pruned` reads.
    """
    config = model.config
    config.head_dim = head_dim(model)
    for shared, per_layer, values in (
        ("intermediate_size", MLP_SIZES_FIELD, mlp_sizes(model)),
        ("num_attention_heads", ATTENTION_HEADS_FIELD, attention_heads(model)),
    ):
        setattr(config, shared, max(values))
        if len(set(values)) > 1:
            setattr(config, per_layer, values)
        elif hasattr(config, per_layer):
            delattr(config, per_layer)


# -- Linear layers: sliced or rebuilt, always as new modules ---------------------------------------------------


def new_linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    """A fresh `nn.Linear` on `like`'s device and dtype, with its bias flag and `requires_grad` (never mutate a
    layer's weights in place: `select_candidate` builds candidates that share the teacher's tensors)."""
    layer = nn.Linear(
        in_features, out_features, bias=like.bias is not None, device=like.weight.device, dtype=like.weight.dtype
    )
    layer.weight.requires_grad_(like.weight.requires_grad)
    if layer.bias is not None:
        layer.bias.requires_grad_(like.bias.requires_grad)
    return layer


def sliced_linear(
    linear: nn.Linear, *, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None
) -> nn.Linear:
    """A new `nn.Linear` that keeps output features `rows` and input features `columns` of `linear` (all of them
    where None); the bias follows the rows."""
    weight = linear.weight
    rows = None if rows is None else rows.to(weight.device)
    columns = None if columns is None else columns.to(weight.device)
    out_features = linear.out_features if rows is None else len(rows)
    in_features = linear.in_features if columns is None else len(columns)
    new = new_linear(in_features, out_features, linear)
    with torch.no_grad():
        kept = weight if rows is None else weight.index_select(0, rows)
        new.weight.copy_(kept if columns is None else kept.index_select(1, columns))
        if linear.bias is not None:
            new.bias.copy_(linear.bias if rows is None else linear.bias.index_select(0, rows))
    return new


def head_rows(heads: torch.Tensor, size: int) -> torch.Tensor:
    """The rows of `q_proj` (or columns of `o_proj`) that hold the query heads `heads`, each `size` wide."""
    return (heads[:, None] * size + torch.arange(size, device=heads.device)).flatten()


def resize_mlp(mlp: nn.Module, size: int) -> None:
    """Replace a GLU MLP's projections with uninitialised ones of MLP size `size` (weights loaded later)."""
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        setattr(mlp, name, new_linear(old.in_features, size, old))
    mlp.down_proj = new_linear(size, mlp.down_proj.out_features, mlp.down_proj)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = size


def resize_attention_heads(attention: nn.Module, heads: int, size: int, kv_heads: int) -> None:
    """Give an attention module `heads` query heads with uninitialised weights (loading fills them)."""
    old = attention.q_proj
    attention.q_proj = new_linear(old.in_features, heads * size, old)
    attention.o_proj = new_linear(heads * size, attention.o_proj.out_features, attention.o_proj)
    attention.num_key_value_groups = heads // kv_heads
