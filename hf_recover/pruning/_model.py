"""What pruning needs to know about a Hugging Face decoder-only model: where its blocks and MLPs
are, which config fields are per-layer, and how the `PrunedConfig` travels with it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..constants import SUPPORTED_ARCHITECTURES
from ..evaluation import count_parameters
from ..pruned_config import PrunedConfig

MLP_SIZES_FIELD = "hf_recover_intermediate_sizes"
PER_LAYER_CONFIG_FIELDS = ("layer_types", "mlp_layer_types", "no_rope_layers", MLP_SIZES_FIELD)
"""Config fields holding one entry per block; sliced by the kept block indices."""
"""Config field holding per-layer MLP sizes when they differ (transformers takes a single int)."""

ATTENTION_HEADS_FIELD = "hf_recover_attention_heads"
"""Config field holding per-layer query-head counts when they differ (transformers takes a single int)."""

GLU_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


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


def mlp_sizes(model: nn.Module) -> list[int]:
    """The MLP (intermediate) size of every block, read from the weights."""
    sizes = []
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        up = getattr(mlp, "up_proj", None)
        sizes.append(up.out_features if isinstance(up, nn.Linear) else int(model.config.intermediate_size))
    return sizes


def sync_mlp_sizes(model: nn.Module) -> None:
    """Write the per-layer MLP sizes into the config, so that `save_pretrained` describes the weights.

    Equal sizes go to `intermediate_size` (plain `from_pretrained` works); different ones also go to
    `hf_recover_intermediate_sizes`, which `hf_recover.load_pruned` reads.
    """
    sizes = mlp_sizes(model)
    config = model.config
    config.intermediate_size = max(sizes)
    if len(set(sizes)) > 1:
        setattr(config, MLP_SIZES_FIELD, sizes)
    elif hasattr(config, MLP_SIZES_FIELD):
        delattr(config, MLP_SIZES_FIELD)


def head_dim(model: nn.Module) -> int:
    """The size of one attention head: `config.head_dim` where set, else hidden / heads, as transformers has it."""
    config = model.config
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def attention_heads(model: nn.Module) -> list[int]:
    """The number of query heads of every block, read from the weights (`q_proj` rows / head size)."""
    size = head_dim(model)
    return [layer.self_attn.q_proj.out_features // size for layer in decoder_layers(model)]


def sync_attention_heads(model: nn.Module) -> None:
    """Write the per-layer query-head counts into the config, as `sync_mlp_sizes` does for MLP sizes.

    The head size is written explicitly first: several architectures derive it from hidden / heads, which
    pruning heads or the hidden size would change. Equal counts go to `num_attention_heads`; different ones
    also go to `hf_recover_attention_heads` (`num_attention_heads` then holds the largest count).
    """
    config = model.config
    config.head_dim = head_dim(model)
    counts = attention_heads(model)
    config.num_attention_heads = max(counts)
    if len(set(counts)) > 1:
        setattr(config, ATTENTION_HEADS_FIELD, counts)
    elif hasattr(config, ATTENTION_HEADS_FIELD):
        delattr(config, ATTENTION_HEADS_FIELD)


def new_linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    """A fresh `nn.Linear` on `like`'s device and dtype (never mutate a layer's weights in place:
    `select_candidate` builds candidates that share the teacher's tensors)."""
    layer = nn.Linear(
        in_features, out_features, bias=like.bias is not None, device=like.weight.device, dtype=like.weight.dtype
    )
    layer.weight.requires_grad_(like.weight.requires_grad)
    if layer.bias is not None:
        layer.bias.requires_grad_(like.bias.requires_grad)
    return layer


def teacher_license(name_or_path: str | None) -> str | None:
    try:
        from ..defaults.teacher import DEFAULT_TEACHER_ID, DEFAULT_TEACHER_LICENSE
    except ImportError:  # pragma: no cover - the defaults are optional for pruning
        return None
    return DEFAULT_TEACHER_LICENSE if name_or_path == DEFAULT_TEACHER_ID else None


def base_pruned_config(model: nn.Module) -> PrunedConfig:
    """A `PrunedConfig` with `model` as the teacher and nothing pruned yet (filled in by the caller)."""
    config = model.config
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None
    sizes = mlp_sizes(model)
    n = len(sizes)
    return PrunedConfig(
        teacher_name_or_path=name,
        teacher_revision=getattr(config, "_commit_hash", None),
        architecture=config.model_type,
        teacher_num_layers=n,
        kept_layer_indices=list(range(n)),
        teacher_intermediate_sizes=sizes,
        student_intermediate_sizes=list(sizes),
        teacher_hidden_size=config.hidden_size,
        student_hidden_size=config.hidden_size,
        teacher_attention_heads=attention_heads(model),
        student_attention_heads=attention_heads(model),
        teacher_num_parameters=count_parameters(model),
        license=teacher_license(name),
    )


def finish_pruning(
    model: nn.Module,
    teacher: PrunedConfig,
    previous: PrunedConfig | None,
    *,
    kept_layer_indices: list[int],
    step: dict[str, Any],
    data: str | None = None,
) -> PrunedConfig:
    """Describe the pruning of `teacher` into `model` (already pruned), compose it with an earlier
    pruning `previous` of the same model, attach the result as `model.pruned_config` and return it."""
    sync_mlp_sizes(model)
    sync_attention_heads(model)
    config = replace(
        teacher,
        kept_layer_indices=list(kept_layer_indices),
        student_intermediate_sizes=mlp_sizes(model),
        student_hidden_size=model.config.hidden_size,
        student_attention_heads=attention_heads(model),
        student_num_parameters=count_parameters(model),
        steps=[step],
        data=data,
    )
    result = previous.then(config) if previous is not None else config
    model.pruned_config = result
    return result


def describe_data(data: Any, tokens: int, sequences: int) -> str:
    """A short human description of calibration data, for `PrunedConfig.data`."""
    name = None
    info = getattr(data, "info", None)
    if info is not None:
        name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    split = getattr(data, "split", None)
    source = f" from {name}" + (f" ({split})" if split else "") if name else ""
    return f"{tokens} calibration tokens in {sequences} sequences{source}"
