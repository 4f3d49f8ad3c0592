"""Hidden-state distillation: which teacher block each student block imitates (layer maps), the learnable
projectors that bring student hidden states to the teacher's width when they differ, and the two losses that
compare them: hidden-state alignment and feature dynamics (FDD).

Block indices are 0-based; `layer_map[i]` is the teacher block aligned with student block `i`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..base.losses.chunking import compute_dtype
from ..base.losses.reduction import check_num_items, next_token_mask, token_normaliser

if TYPE_CHECKING:
    from ..base.pruned_config import PrunedConfig

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
    return [teacher for _, teacher in layer_map_pairs(list(kind_or_list), n_s, n_t)]


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


# -- the last block's raw output ------------------------------------------------------------------------------


def last_block_output(model: nn.Module, enabled: bool):
    """Capture the raw output of `model`'s last transformer block during a forward inside the block.

    Yields a list that holds that output once the forward ran; it stays empty when disabled or when the blocks
    are not found as `model.model.layers` through DDP/DeepSpeed/PEFT wrappers (the HF hidden state is used then).
    """
    from .lm_head import first_output

    return first_output(_last_block(model) if enabled else None)


def _last_block(model: nn.Module) -> nn.Module | None:
    from .lm_head import base_model

    layers = getattr(getattr(base_model(model), "model", None), "layers", None)
    return layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else None


def with_last_block(hidden_states: tuple[torch.Tensor, ...], last: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (*hidden_states[:-1], last[0]) if last else tuple(hidden_states)


# -- hidden-state losses ---------------------------------------------------------------------------------------

Projectors = Sequence[Callable[[torch.Tensor], torch.Tensor] | None] | Mapping[int | str, Callable] | nn.Module


class LayerPairs(tuple):
    """Validated `(student_block, teacher_block)` pairs, sorted by student block, as `layer_map_pairs` returns
    them. The hidden-state losses take them as they are: a trainer validates its layer map once, not per step."""


def layer_map_pairs(layer_map: Sequence[int] | Mapping[int, int], num_student: int, num_teacher: int) -> LayerPairs:
    """`layer_map` (one teacher block per student block, or a dict `{student_block: teacher_block}`) as validated
    pairs. The one validation of a layer map: `build_layer_map`, the trainer and the losses all go through it."""
    if isinstance(layer_map, LayerPairs):
        return layer_map
    if isinstance(layer_map, Mapping):
        items = sorted(layer_map.items())
    elif isinstance(layer_map, Sequence) and not isinstance(layer_map, str):
        if len(layer_map) != num_student:
            raise ValueError(
                f"`layer_map` has {len(layer_map)} entries but the student has {num_student} blocks: give one teacher "
                f"block (0..{num_teacher - 1}) per student block, or a dict {{student_block: teacher_block}} to align "
                "only some blocks."
            )
        items = list(enumerate(layer_map))
    else:
        raise ValueError(f"`layer_map` must be a list of teacher block indices or a dict, got {type(layer_map)}.")
    if not items:
        raise ValueError("`layer_map` is empty: map at least one student block to a teacher block.")
    for student_block, teacher_block in items:
        for value in (student_block, teacher_block):
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise ValueError(f"`layer_map` holds {value!r}: block indices are ints.")
        if not 0 <= student_block < num_student:
            raise ValueError(
                f"`layer_map` names student block {student_block}, but the student has {num_student} blocks "
                f"(valid indices 0..{num_student - 1})."
            )
        if not 0 <= teacher_block < num_teacher:
            raise ValueError(
                f"`layer_map` maps student block {student_block} to teacher block {teacher_block}, but the teacher "
                f"has {num_teacher} blocks (valid indices are 0..{num_teacher - 1}). Block indices are 0-based."
            )
    return LayerPairs((int(s), int(t)) for s, t in items)


def _projector_for(projectors: Projectors | None, student_block: int):
    if projectors is None:
        return None
    if isinstance(projectors, (Mapping, nn.ModuleDict)):
        # nn.ModuleDict keys are strings; a plain dict may use ints.
        for key in (student_block, str(student_block)):
            if key in projectors:
                return projectors[key]
        return None
    try:
        return projectors[student_block]
    except IndexError:
        raise ValueError(
            f"`projectors` has no entry for student block {student_block} (it has {len(projectors)}); give one "
            "projector per student block (None where the widths already match)."
        ) from None


def _project(states: torch.Tensor, projector) -> torch.Tensor:
    if projector is None:
        return states
    if isinstance(projector, nn.Module):
        parameter = next(projector.parameters(), None)
        if parameter is not None and parameter.is_floating_point():
            states = states.to(parameter.dtype)  # bf16 states into a float32 projector outside autocast
    return projector(states)


def _check_hidden_states(student_hidden_states, teacher_hidden_states, labels: torch.Tensor) -> tuple[int, int]:
    """Validate the two tuples; return the number of student and teacher blocks."""
    if labels.dim() != 2:
        raise ValueError(f"`labels` must be (batch, seq_len), got shape {tuple(labels.shape)}.")
    for name, states in (
        ("student_hidden_states", student_hidden_states),
        ("teacher_hidden_states", teacher_hidden_states),
    ):
        if isinstance(states, torch.Tensor) or not isinstance(states, Sequence) or len(states) < 2:
            raise ValueError(
                f"`{name}` must be the tuple a model returns with `output_hidden_states=True` (the embeddings, then "
                f"one tensor per block), got {type(states).__name__}"
                + (f" of length {len(states)}" if isinstance(states, Sequence) else "")
                + "."
            )
        for state in states:
            if state.dim() != 3 or state.shape[:2] != labels.shape:
                raise ValueError(
                    f"Every tensor in `{name}` must be (batch, seq_len, hidden) with (batch, seq_len) = labels' shape "
                    f"{tuple(labels.shape)}, got {tuple(state.shape)}."
                )
    return len(student_hidden_states) - 1, len(teacher_hidden_states) - 1


def _block_states(hidden_states, block: int, batch_index, position_index, projector=None) -> torch.Tensor:
    """Output of `block` on the valid positions, projected: `hidden_states[block + 1]` (B, T, H) -> (N, H)."""
    states = _project(hidden_states[block + 1][batch_index, position_index], projector)
    return states.to(compute_dtype(states.dtype))


def _check_widths(student_states: torch.Tensor, teacher_states: torch.Tensor, student_block: int, teacher_block: int):
    if student_states.size(-1) != teacher_states.size(-1):
        raise ValueError(
            f"Student block {student_block} has width {student_states.size(-1)} (after its projector, if any) but "
            f"teacher block {teacher_block} has width {teacher_states.size(-1)}: pass `projectors` that map the "
            "student's hidden size to the teacher's."
        )


def hidden_alignment_loss(
    student_hidden_states: Sequence[torch.Tensor],
    teacher_hidden_states: Sequence[torch.Tensor],
    layer_map: Sequence[int] | Mapping[int, int],
    labels: torch.Tensor,
    *,
    projectors: Projectors | None = None,
    kind: str = "cosine",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Align the student's block outputs with the teacher's, mean over mapped pairs.

    For each pair `(i, layer_map[i])`: per valid token, `1 − cos(P_i h_s[i], h_t[layer_map[i]])` (`kind="cosine"`)
    or the squared error averaged over the hidden dimension (`kind="mse"`); summed over valid tokens and divided
    by their count (or `num_items_in_batch`). The result is the mean of that over the pairs.

    Args:
        student_hidden_states, teacher_hidden_states: the tuples a model returns with `output_hidden_states=True`:
            the embeddings first, then one `(batch, seq_len, hidden)` tensor per block, so block `i`'s output is
            `hidden_states[i + 1]`.
        layer_map: `layer_map[i]` is the 0-based teacher block aligned with student block `i` (one per student
            block), or a dict `{student_block: teacher_block}` to align only some blocks.
        labels: `(batch, seq_len)` unshifted labels; the valid positions are those of the logit losses (position
            `t` counts when label `t + 1` is not `-100`).
        projectors: `projectors[i]` maps student block `i`'s states to the teacher's width (a list or
            `nn.ModuleList` indexed by student block, or a dict / `nn.ModuleDict` keyed by it; `None` entries or
            missing keys mean no projection). Required where widths differ.
        kind: `"cosine"` or `"mse"`.
        num_items_in_batch: divide the token sums by this instead of the local valid-token count.
    """
    if kind not in ("cosine", "mse"):
        raise ValueError(f"`kind` must be 'cosine' or 'mse', got {kind!r}.")
    num_student, num_teacher = _check_hidden_states(student_hidden_states, teacher_hidden_states, labels)
    pairs = layer_map_pairs(layer_map, num_student, num_teacher)
    check_num_items(num_items_in_batch)

    batch_index, position_index = next_token_mask(labels.to(student_hidden_states[0].device)).nonzero(as_tuple=True)
    token_sums = []
    for student_block, teacher_block in pairs:
        projector = _projector_for(projectors, student_block)
        student = _block_states(student_hidden_states, student_block, batch_index, position_index, projector)
        teacher = _block_states(teacher_hidden_states, teacher_block, batch_index, position_index).to(student.dtype)
        _check_widths(student, teacher, student_block, teacher_block)
        if kind == "cosine":
            per_token = 1 - F.cosine_similarity(student, teacher, dim=-1)  # (N, H) -> (N,)
        else:
            per_token = (student - teacher).pow(2).mean(-1)
        token_sums.append(per_token.sum())
    scale = token_normaliser(batch_index.numel(), num_items_in_batch, student.device, student.dtype)
    return torch.stack(token_sums).mean() * scale


def feature_dynamics_loss(
    student_hidden_states: Sequence[torch.Tensor],
    teacher_hidden_states: Sequence[torch.Tensor],
    layer_map: Sequence[int] | Mapping[int, int],
    labels: torch.Tensor,
    *,
    projectors: Projectors | None = None,
    magnitude_weight: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Feature dynamics distillation (Gong et al., ACL 2025): align how the residual stream *moves*.

    For consecutive mapped student blocks `i, j` (`j = i + 1` with a full `layer_map`), per valid token:
    `1 − cos(Δ_s, Δ_t)` with `Δ_s = P_j h_s[j] − P_i h_s[i]` and `Δ_t = h_t[map[j]] − h_t[map[i]]`, plus, when
    `magnitude_weight > 0`, `magnitude_weight × | ‖Δ_s‖ − ‖Δ_t‖ | / ‖Δ_t‖` (the relative difference of the
    delta norms). Token sums are divided by the valid-token count (or `num_items_in_batch`) and the result is
    the mean over the consecutive pairs. Each block's states are projected by its own projector before the
    difference is taken, so `projectors` means what it means in `hidden_alignment_loss`.

    Arguments are those of `hidden_alignment_loss`; at least two student blocks must be mapped.
    """
    if not isinstance(magnitude_weight, Real) or not math.isfinite(magnitude_weight) or magnitude_weight < 0:
        raise ValueError(f"`magnitude_weight` must be a finite number >= 0, got {magnitude_weight!r}.")
    num_student, num_teacher = _check_hidden_states(student_hidden_states, teacher_hidden_states, labels)
    pairs = layer_map_pairs(layer_map, num_student, num_teacher)
    if len(pairs) < 2:
        raise ValueError(
            f"`feature_dynamics_loss` compares consecutive student blocks but `layer_map` maps only {len(pairs)}; "
            "map at least two student blocks."
        )
    check_num_items(num_items_in_batch)

    batch_index, position_index = next_token_mask(labels.to(student_hidden_states[0].device)).nonzero(as_tuple=True)

    def states(student_block: int, teacher_block: int) -> tuple[torch.Tensor, torch.Tensor]:
        projector = _projector_for(projectors, student_block)
        student = _block_states(student_hidden_states, student_block, batch_index, position_index, projector)
        teacher = _block_states(teacher_hidden_states, teacher_block, batch_index, position_index).to(student.dtype)
        _check_widths(student, teacher, student_block, teacher_block)
        return student, teacher

    token_sums = []
    previous_student, previous_teacher = states(*pairs[0])
    for student_block, teacher_block in pairs[1:]:
        student, teacher = states(student_block, teacher_block)
        student_delta, teacher_delta = student - previous_student, teacher - previous_teacher  # (N, H)
        per_token = 1 - F.cosine_similarity(student_delta, teacher_delta, dim=-1)
        if magnitude_weight > 0:
            student_norm, teacher_norm = student_delta.norm(dim=-1), teacher_delta.norm(dim=-1)
            eps = torch.finfo(teacher_norm.dtype).eps  # a zero teacher delta must not divide by zero
            relative_gap = (student_norm - teacher_norm).abs() / teacher_norm.clamp_min(eps)
            per_token = per_token + magnitude_weight * relative_gap
        token_sums.append(per_token.sum())
        previous_student, previous_teacher = student, teacher
    scale = token_normaliser(batch_index.numel(), num_items_in_batch, student.device, student.dtype)
    return torch.stack(token_sums).mean() * scale
