"""What a logit loss reads, and the run of the chunk engine over it.

Either side of a loss is given as logits, or as `LMHeadInputs` (final hidden states and lm_head, whose logits are
then computed block by block and never exist whole); the teacher may also be a cached `TopKTeacher`. `loss_sources`
validates both sides against the labels and wraps them as the chunk engine's sources (`hf_recover.base.losses.
chunking`); `run_chunked` runs the engine over the valid positions.
"""

from __future__ import annotations

from numbers import Real
from typing import NamedTuple

import torch

from ..constants import IGNORE_INDEX
from .chunking import (
    LossSpec,
    StudentHead,
    StudentLogits,
    TeacherHead,
    TeacherLogits,
    TeacherTopK,
    chunked_loss,
    compute_dtype,
    default_block_size,
    default_chunk_size,
)
from .kernels import Kernel
from .reduction import next_token_targets, token_normaliser
from .topk import TopKTeacher, check_top_k_teacher
from .validation import check_logits, check_run_args, check_targets


class LMHeadInputs(NamedTuple):
    """A model's logits given by what makes them: `logits = softcap(hidden_states @ weight.T + bias)`."""

    hidden_states: torch.Tensor
    """`(batch, seq_len, hidden)`: the final hidden states (after the final norm), what the lm_head receives."""
    weight: torch.Tensor
    """`(vocab, hidden)`: the lm_head weight (tied embeddings work as they are)."""
    bias: torch.Tensor | None = None
    softcap: float | None = None
    """Gemma's `final_logit_softcapping`: logits become `softcap · tanh(logits / softcap)`."""


def check_head(head: LMHeadInputs, name: str) -> torch.Tensor:
    """Validate an lm_head side; return a zero-stride stand-in for its logits (validated like logits, never
    allocated)."""
    hidden, weight, bias, softcap = head
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(
            f"`{name}` hidden states must be a floating-point tensor of shape (batch, seq_len, hidden), got "
            f"{hidden.dtype} of shape {tuple(hidden.shape)}."
        )
    if weight.dim() != 2 or weight.size(1) != hidden.size(-1):
        raise ValueError(
            f"`{name}` lm_head weight must be (vocab, hidden) with hidden = {hidden.size(-1)} (the hidden states' "
            f"width), got shape {tuple(weight.shape)}."
        )
    if bias is not None and tuple(bias.shape) != (weight.size(0),):
        raise ValueError(f"`{name}` lm_head bias must be ({weight.size(0)},), got {tuple(bias.shape)}.")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, Real) or not softcap > 0):
        raise ValueError(f"`{name}` softcap must be a number > 0 or None, got {softcap!r}.")
    return hidden.new_empty(()).expand(*hidden.shape[:2], weight.size(0))


def loss_sources(
    student, teacher, labels, temperature: float
) -> tuple[StudentLogits | StudentHead, TeacherLogits | TeacherHead | TeacherTopK]:
    """Validate both sides (logits, `LMHeadInputs`, a `TopKTeacher`) against the labels; wrap them as sources."""
    student_logits = check_head(student, "student") if isinstance(student, LMHeadInputs) else student
    if isinstance(teacher, TopKTeacher):
        vocab = check_logits(student_logits, student_logits, labels)  # the student's side against the labels
        check_top_k_teacher(teacher, tuple(labels.shape), vocab)
        student_side = StudentHead(*student) if isinstance(student, LMHeadInputs) else StudentLogits(student)
        return student_side, TeacherTopK(*teacher, temperature=float(temperature))
    teacher_logits = check_head(teacher, "teacher") if isinstance(teacher, LMHeadInputs) else teacher
    check_logits(student_logits, teacher_logits, labels)
    if (
        isinstance(teacher, LMHeadInputs)
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in teacher[:3])
    ):
        raise ValueError(
            "The teacher's hidden states or lm_head require a gradient, which a teacher given as LMHeadInputs does "
            "not receive: pass them detached (the trainer runs its teacher without gradients), or pass its logits."
        )
    student_side = StudentHead(*student) if isinstance(student, LMHeadInputs) else StudentLogits(student)
    teacher_side = TeacherHead(*teacher) if isinstance(teacher, LMHeadInputs) else TeacherLogits(teacher)
    return student_side, teacher_side


def run_chunked(
    kernel: Kernel,
    student: StudentLogits | StudentHead,
    teacher: TeacherLogits | TeacherHead,
    labels: torch.Tensor,
    temperature: float,
    num_items_in_batch: int | torch.Tensor | None,
    chunk_size: int | None,
    weights: tuple[float, float | None] = (1.0, None),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the run arguments, then run the chunk engine over the valid positions: (loss, divergence, CE)."""
    check_run_args(temperature, chunk_size, num_items_in_batch)
    targets = next_token_targets(labels.to(student.device))
    if weights[1] is not None:
        check_targets(targets, student.vocab)
    num_valid = targets.ne(IGNORE_INDEX).sum()
    scale = token_normaliser(num_valid, num_items_in_batch, student.device, compute_dtype(student.dtype))
    chunk = chunk_size or default_chunk_size(student.vocab, student.device)
    block = None if chunk_size else default_block_size(chunk, student, teacher)  # a given size bounds all
    spec = LossSpec(kernel, float(temperature), chunk, kd_weight=weights[0], ce_weight=weights[1], block_size=block)
    return chunked_loss(spec, student, teacher, targets, scale)
