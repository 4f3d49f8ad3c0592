"""Which teacher block each student block imitates (layer maps), and the learnable projectors that bring
student hidden states to the teacher's width when they differ.

Block indices are 0-based; `layer_map[i]` is the teacher block aligned with student block `i`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .pruned_config import PrunedConfig

LAYER_MAP_KINDS = ("kept", "uniform", "last")


def build_layer_map(
    kind_or_list: str | Sequence[int],
    *,
    student_num_layers: int,
    teacher_num_layers: int,
    pruned_config: PrunedConfig | None = None,
) -> list[int]:
    """The student → teacher block map, one teacher block per student block.

    - `"kept"`: the teacher blocks that depth pruning kept (`pruned_config.kept_layer_indices`): exact.
    - `"uniform"`: `⌊i·n_t/n_s⌋`, spread evenly over the teacher.
    - `"last"`: `i + (n_t − n_s)`, the teacher's last `n_s` blocks.
    - a list: given explicitly, validated against both models.
    """
    n_s, n_t = student_num_layers, teacher_num_layers
    if n_s < 1 or n_t < 1:
        raise ValueError(f"Both models need at least one block; got student {n_s}, teacher {n_t}.")
    if isinstance(kind_or_list, str):
        if kind_or_list == "kept":
            return _kept_map(pruned_config, n_s, n_t)
        if kind_or_list == "uniform":
            return [i * n_t // n_s for i in range(n_s)]
        if kind_or_list == "last":
            if n_s > n_t:
                raise ValueError(
                    f"layer_map='last' needs a student no deeper than its teacher; got {n_s} > {n_t} blocks. "
                    "Use 'uniform' or an explicit list."
                )
            return [i + n_t - n_s for i in range(n_s)]
        raise ValueError(f"layer_map must be one of {LAYER_MAP_KINDS} or a list of ints, got {kind_or_list!r}.")
    layer_map = list(kind_or_list)
    if len(layer_map) != n_s:
        raise ValueError(
            f"layer_map has {len(layer_map)} entries but the student has {n_s} blocks; give one teacher block "
            f"(0..{n_t - 1}) per student block."
        )
    bad = [i for i in layer_map if type(i) is not int or not 0 <= i < n_t]
    if bad:
        raise ValueError(f"layer_map entries {bad} are not teacher blocks: valid indices are 0..{n_t - 1}.")
    return layer_map


def _kept_map(pruned_config: PrunedConfig | None, n_s: int, n_t: int) -> list[int]:
    if pruned_config is None:
        raise ValueError(
            "layer_map='kept' needs the PrunedConfig of the student (pass pruned_config=, prune with hf_recover, or "
            "load a student folder holding pruned_config.json). Without one, use layer_map='uniform', 'last' or an "
            "explicit list such as '0,2,4'."
        )
    if pruned_config.num_student_layers != n_s or pruned_config.teacher_num_layers != n_t:
        raise ValueError(
            f"The PrunedConfig describes a {pruned_config.teacher_num_layers}-block teacher pruned to "
            f"{pruned_config.num_student_layers} blocks, but the models have {n_t} (teacher) and {n_s} (student) "
            "blocks. Pass the PrunedConfig of this student and teacher, or another layer_map."
        )
    return pruned_config.layer_map()


class HiddenProjector(nn.Linear):
    """A linear map from student to teacher hidden states, kept in float32 whatever the student's dtype."""

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int):
        super().__init__(student_hidden_size, teacher_hidden_size, bias=False, dtype=torch.float32)
        if student_hidden_size == teacher_hidden_size:
            # Start from "no projection", so the alignment loss at step 0 is the unprojected one.
            nn.init.eye_(self.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states.to(self.weight.dtype))


def build_projectors(
    kind: str, *, num_student_layers: int, student_hidden_size: int, teacher_hidden_size: int
) -> nn.ModuleList | None:
    """One `HiddenProjector` per student block, or `None` when no projection is wanted.

    `kind="auto"` builds them only when the hidden sizes differ; `"linear"` always; `"none"` never (and then
    different hidden sizes are an error).
    """
    if kind not in ("auto", "none", "linear"):
        raise ValueError(f"projector must be 'auto', 'none' or 'linear', got {kind!r}.")
    differ = student_hidden_size != teacher_hidden_size
    if kind == "none" and differ:
        raise ValueError(
            f"projector='none' but the student's hidden size ({student_hidden_size}) differs from the teacher's "
            f"({teacher_hidden_size}); hidden states cannot be compared. Use projector='auto' or 'linear'."
        )
    if kind == "none" or (kind == "auto" and not differ):
        return None
    return nn.ModuleList(HiddenProjector(student_hidden_size, teacher_hidden_size) for _ in range(num_student_layers))
