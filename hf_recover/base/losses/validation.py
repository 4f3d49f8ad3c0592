"""Checks every logit loss runs before any work: shapes, dtypes, vocabularies, targets and run arguments."""

from __future__ import annotations

import math
from numbers import Real

import torch

from ..constants import IGNORE_INDEX
from .reduction import check_num_items

MAX_PADDING_ROWS = 256
"""Vocabulary padding rule: a teacher vocabulary larger than the student's is accepted as padding
when it has at most `max(MAX_PADDING_ROWS, 1% of the student's vocabulary)` extra rows. Models pad
their embedding matrix to a multiple of 64, 128 or 256 (Qwen2.5: 151936 tokenizer rows vs 152064
in the 7B checkpoints), which adds fewer than 256 rows; different tokenizers differ by far more
(32000 vs 128256), and a loss between them would be silently wrong."""


# -- validation ----------------------------------------------------------------------------------------------------


def check_unit_interval(name: str, value: float) -> None:
    if not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")


def check_run_args(temperature: float, chunk_size: int | None, num_items_in_batch) -> None:
    if not isinstance(temperature, Real) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive number of tokens or None (automatic), got {chunk_size!r}.")
    check_num_items(num_items_in_batch)


def shared_vocab_size(student_vocab: int, teacher_vocab: int) -> int:
    """The vocabulary size both models score; see `MAX_PADDING_ROWS` for the rule."""
    if student_vocab == teacher_vocab:
        return student_vocab
    extra = teacher_vocab - student_vocab
    if 0 < extra <= max(MAX_PADDING_ROWS, student_vocab // 100):
        return student_vocab  # the teacher's extra rows are embedding padding: slice them off
    raise ValueError(
        f"Student vocabulary size {student_vocab} and teacher vocabulary size {teacher_vocab} differ by more than "
        f"padding rows (a teacher may have at most max({MAX_PADDING_ROWS}, 1%) more rows than the student, never "
        f"fewer). The models most likely use different tokenizers; distil between models that share a tokenizer."
    )


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Validate shapes and dtypes; return the shared vocabulary size."""
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if logits.dim() != 3 or not logits.is_floating_point():
            raise ValueError(
                f"`{name}` must be a floating-point tensor of shape (batch, seq_len, vocab), "
                f"got {logits.dtype} of shape {tuple(logits.shape)}."
            )
    if labels.dim() != 2 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"`labels` must be an integer tensor of shape (batch, seq_len), got {labels.dtype} of shape "
            f"{tuple(labels.shape)}."
        )
    if student_logits.shape[:2] != labels.shape or teacher_logits.shape[:2] != labels.shape:
        raise ValueError(
            f"Logits and labels must agree on (batch, seq_len): student_logits {tuple(student_logits.shape)}, "
            f"teacher_logits {tuple(teacher_logits.shape)}, labels {tuple(labels.shape)}. Pass the unshifted labels "
            "of the batch, as a causal LM receives them."
        )
    return shared_vocab_size(student_logits.size(-1), teacher_logits.size(-1))


def ids_outside(ids: torch.Tensor, vocab: int) -> tuple[int, int] | None:
    """`(lowest, highest)` of token ids `ids` when any lies outside `[0, vocab)`; None when all lie inside (or there
    are none). One device sync for both ends."""
    if not ids.numel():
        return None
    low, high = torch.stack([ids.min(), ids.max()]).tolist()
    return (low, high) if low < 0 or high >= vocab else None


def check_targets(targets: torch.Tensor, vocab: int) -> None:
    """Cross-entropy targets must be token ids of the student's vocabulary (or ignored)."""
    if outside := ids_outside(targets[targets != IGNORE_INDEX], vocab):
        raise ValueError(
            f"`labels` must be token ids in [0, {vocab}) (the student's vocabulary) or {IGNORE_INDEX} (ignored); "
            f"got values from {outside[0]} to {outside[1]}."
        )
