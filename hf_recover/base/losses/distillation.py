"""The student's cross-entropy and a divergence in one pass over the logits (`distillation_loss`, what the trainer
minimises), and a divergence straight from the student's final hidden states and lm_head
(`fused_linear_divergence`)."""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch

from .divergences import kernel_for
from .inputs import LMHeadInputs, loss_sources, run_chunked
from .kernels import clipped_kernel


class DistillationLoss(NamedTuple):
    """What `distillation_loss` returns."""

    loss: torch.Tensor
    """`ce_weight · ce + kd_weight · kd`, differentiable."""
    ce: torch.Tensor
    """The student's mean cross-entropy on the labels, detached (for logging)."""
    kd: torch.Tensor
    """The mean divergence at temperature `T` (without `T²`), detached (for logging)."""


def distillation_loss(
    student_logits: torch.Tensor | LMHeadInputs,
    teacher_logits: torch.Tensor | LMHeadInputs,
    labels: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    max_token_divergence: float | None = None,
    **divergence_params: float,
) -> DistillationLoss:
    """`ce_weight · CE(student, labels) + kd_weight · divergence(teacher ‖ student)` in one pass over the logits.

    Equal, values and gradients, to `ce_weight * F.cross_entropy(...)` (Hugging Face's causal-LM loss: shifted
    labels, `-100` ignored, float32, divided by the valid tokens or `num_items_in_batch`) plus `kd_weight *
    DIVERGENCES[divergence](...)`, but each chunk of logits is read once for both terms and the logits receive a
    single gradient tensor: no separate cross-entropy pass, no second `(batch, seq_len, vocab)` gradient to add
    up. The `DistillationTrainer` uses it for its `alpha·CE + beta·T²·KD` (with `kd_weight = beta·T²`).

    Either side may be given as `LMHeadInputs` (final hidden states and lm_head) instead of logits: its logits
    are then computed chunk by chunk and never exist for the whole batch; for the student, the gradient goes
    straight to the hidden states, the lm_head weight and its bias (as Liger-Kernel's fused linear losses do).
    A teacher given that way is a constant (no gradient). The teacher may also be a `TopKTeacher` (a cached
    teacher, `hf_recover.cache_teacher_outputs`): KD is then taken on its top-k tokens plus a tail bucket.

    Args:
        student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size: as in `forward_kl`;
            the cross-entropy is taken at temperature 1 over the student's whole vocabulary.
        divergence: a key of `DIVERGENCES`.
        ce_weight, kd_weight: finite weights >= 0. With `ce_weight = 0` the cross-entropy is still reported, but
            its gradient is not computed.
        max_token_divergence: clip each token's divergence at this value (a token above it gives no gradient), as
            on-policy distillation of a weak student does; None: no clipping.
        **divergence_params: `skew_lambda=` for the skew divergences, `beta=` for `generalized_jsd`.
    """
    kernel = kernel_for(divergence, divergence_params)
    if max_token_divergence is not None:
        if not max_token_divergence > 0:
            raise ValueError(f"max_token_divergence must be > 0 or None, got {max_token_divergence!r}.")
        kernel = clipped_kernel(kernel, float(max_token_divergence))
    for name, weight in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"`{name}` must be a finite number >= 0, got {weight!r}.")
    student, teacher = loss_sources(student_logits, teacher_logits, labels, temperature)
    loss, kd, ce = run_chunked(
        kernel,
        student,
        teacher,
        labels,
        temperature,
        num_items_in_batch,
        chunk_size,
        (float(kd_weight), float(ce_weight)),
    )
    return DistillationLoss(loss=loss, ce=ce, kd=kd)


def fused_linear_divergence(
    student_hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    lm_head_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    **divergence_params: float,
) -> torch.Tensor:
    """A divergence of `DIVERGENCES` computed from the student's last hidden states and its lm_head.

    Equal to `DIVERGENCES[divergence](F.linear(student_hidden_states, lm_head_weight, lm_head_bias),
    teacher_logits, labels, ...)`, values and gradients, but the student's `(batch, seq_len, vocab)` logits
    and their gradient are never stored: each chunk's logits are computed, used and dropped, and its
    gradient goes straight to the hidden states, `lm_head_weight` and `lm_head_bias`. The teacher is a
    constant here (pass its logits detached, as the trainer does). Each chunk's logits gradient is computed in
    the lm_head's dtype before its matmuls: prefer bfloat16 to float16 weights, where small entries underflow.

    Args:
        student_hidden_states: `(batch, seq_len, hidden)`, the student's final hidden states (after the final
            norm), i.e. what its lm_head receives.
        lm_head_weight: `(vocab, hidden)`, the student's `lm_head.weight` (tied embeddings work as they are).
        teacher_logits, labels, temperature, num_items_in_batch, chunk_size: as in `forward_kl`.
        divergence: a key of `DIVERGENCES`.
        lm_head_bias: `(vocab,)`, for the rare lm_head with a bias.
        **divergence_params: `skew_lambda=` for the skew divergences, `beta=` for `generalized_jsd`.
    """
    kernel = kernel_for(divergence, divergence_params)
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "`teacher_logits` requires a gradient, which the fused loss does not propagate: pass "
            "`teacher_logits.detach()`, or use the unfused functions of `DIVERGENCES`."
        )
    head = LMHeadInputs(student_hidden_states, lm_head_weight, lm_head_bias)
    student, teacher = loss_sources(head, teacher_logits, labels, temperature)
    return run_chunked(kernel, student, teacher, labels, temperature, num_items_in_batch, chunk_size)[0]
