"""Logit divergences for distillation: pure functions, tensors in, a scalar tensor out.

Notation: teacher logits `z_t`, student logits `z_s`, temperature `T`, `p = softmax(z_t / T)` and
`q = softmax(z_s / T)`.

Every logit divergence is built from three pieces, each written once:

1. `reduction`: the labels are shifted as a causal LM does (logits at position `t` are scored against label
   `t + 1`); only positions whose shifted label is not `IGNORE_INDEX` count, and their sum is divided by their
   number, or by `num_items_in_batch` under gradient accumulation (the `Trainer` convention).
2. `kernels`: one per-token kernel per divergence, `(N, V)` log-probabilities in, `(N,)` divergences and their
   hand-written gradient out.
3. `chunking`: the one chunk engine. It walks the valid positions in chunks of `chunk_size` tokens, computes
   each chunk's divergence (and, for `distillation_loss`, the student's cross-entropy) in float32 and, in the
   same pass, its gradient, from the student's logits or from its final hidden states and lm_head
   (`fused_linear_divergence`). A cached teacher (`TopKTeacher`) is a sparse target: see `topk`.

`DIVERGENCES` is the one table of divergences: name, function, kernel, parameters (with the
`DistillationConfig` field each one is set by), formula and source. The configuration, the trainer, the model
card and the README read it.

The divergences return the mean over valid tokens at temperature `T`, *not* multiplied by `T²`:
the trainer applies Hinton's `T²` scaling.
"""

from __future__ import annotations

from .chunking import CPU_CHUNK_ELEMENTS, DEFAULT_CHUNK_ELEMENTS
from .distillation import DistillationLoss, distillation_loss, fused_linear_divergence
from .divergences import (
    DIVERGENCES,
    Divergence,
    DivergenceParam,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from .inputs import LMHeadInputs
from .topk import TopKTeacher, teacher_top_k
from .validation import MAX_PADDING_ROWS, shared_vocab_size

__all__ = [
    "CPU_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_ELEMENTS",
    "DIVERGENCES",
    "MAX_PADDING_ROWS",
    "Divergence",
    "DivergenceParam",
    "DistillationLoss",
    "LMHeadInputs",
    "TopKTeacher",
    "distillation_loss",
    "forward_kl",
    "fused_linear_divergence",
    "generalized_jsd",
    "reverse_kl",
    "shared_vocab_size",
    "skew_forward_kl",
    "skew_reverse_kl",
    "teacher_top_k",
    "total_variation",
]
