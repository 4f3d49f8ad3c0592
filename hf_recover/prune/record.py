"""How a pruning is recorded: the teacher's `PrunedConfig` before anything is removed, the step each pruning adds,
and the composed `PrunedConfig` attached to the pruned model (`model.pruned_config`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from ..base.anatomy import attention_heads, mlp_sizes, sync_sizes
from ..base.defaults.teacher import DEFAULT_TEACHER_ID, DEFAULT_TEACHER_LICENSE
from ..base.evaluation import count_parameters
from ..base.pruned_config import PrunedConfig


def teacher_license(name_or_path: str | None) -> str | None:
    """The licence of a teacher hf_recover knows (the embedded one); None for others."""
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
    sync_sizes(model)
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
