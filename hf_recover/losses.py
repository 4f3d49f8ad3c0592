"""Distillation losses: pure functions, tensors in, a scalar tensor out.

Notation (see `DESIGN.md`): teacher logits `z_t`, student logits `z_s`, temperature `T`,
`p = softmax(z_t / T)` and `q = softmax(z_s / T)`.

Every logit divergence is built from three pieces, each written once:

1. `_shifted_targets` / `_valid_mask` shift the labels as a causal LM does (logits at position `t`
   are scored against label `t + 1`) and mark the positions whose shifted label is not
   `IGNORE_INDEX`. Only those positions count; `_token_chunks` walks a mostly valid batch in
   contiguous slices (views, masked) and gathers the valid positions of a sparse one.
2. `_ChunkedLoss` walks those chunks of `chunk_size` tokens, computes the chunk's per-token
   divergence in float32 (and, for `distillation_loss`, the student's cross-entropy) and, in the
   same pass, its gradient with respect to the chunk's logits (as Liger's chunked losses do).
   Backward only scales the stored gradient, so neither pass holds float32 `(tokens, vocab)`
   tensors for more than one chunk.
3. `_normaliser` divides the summed divergence by the number of valid tokens, or by
   `num_items_in_batch` under gradient accumulation (the `Trainer` convention), clamped to at
   least 1 so that a batch without valid tokens yields a zero that keeps its gradient path.

A divergence is then one per-token kernel (`_forward_kl_kernel`, ...): `(N, V)` log-probabilities
in, `(N,)` divergences and their hand-written gradient out (see the comment above the kernels).

The divergences return the mean over valid tokens at temperature `T`, *not* multiplied by `T²`:
the trainer applies Hinton's `T²` scaling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from numbers import Real
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .constants import IGNORE_INDEX

__all__ = [
    "DIVERGENCES",
    "DistillationLoss",
    "distillation_loss",
    "feature_dynamics_loss",
    "forward_kl",
    "fused_linear_divergence",
    "generalized_jsd",
    "hidden_alignment_loss",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
]

DEFAULT_CHUNK_ELEMENTS = 2**23
"""With `chunk_size=None` on an accelerator, chunks hold at least this many logits (32 MiB per float32
temporary): enough work per kernel launch that the chunk loop costs nothing next to the passes themselves."""

CPU_CHUNK_ELEMENTS = 2**21
"""With `chunk_size=None` on CPU, chunks hold at least this many logits (8 MiB per float32 temporary). On
Linux, glibc serves blocks above 32 MiB with a fresh `mmap` and unmaps them when freed, so every 32 MiB
temporary of every chunk costs 8k page faults: measured on 1024 × 49152 logits (CE + forward KL, forward
and backward, 2 cores), 2^23-logit chunks took 0.62-0.80 s and 350k page faults, 2^20-2^22 took 0.34-0.44 s
and only the 49k faults of the gradient tensor. Smaller blocks are recycled from the heap."""

MAX_PADDING_ROWS = 256
"""Vocabulary padding rule: a teacher vocabulary larger than the student's is accepted as padding
when it has at most `max(MAX_PADDING_ROWS, 1% of the student's vocabulary)` extra rows. Models pad
their embedding matrix to a multiple of 64, 128 or 256 (Qwen2.5: 151936 tokenizer rows vs 152064
in the 7B checkpoints), which adds fewer than 256 rows; different tokenizers differ by far more
(32000 vs 128256), and a loss between them would be silently wrong."""


# --------------------------------------------------------------------------------------------
# Per-token kernels: `kernel(student_logp, teacher_logp, with_grad)` takes (N, V) log-probabilities of
# the tempered logits z / T, in float32 (float64 under gradcheck), and returns the (N,) divergences and,
# when `with_grad`, their (N, V) gradient with respect to the tempered student logits z_s / T. The
# gradients are written by hand: that spares each chunk an autograd graph, i.e. passes over (N, V) memory
# and live temporaries. With `with_grad` the kernel runs without autograd and may overwrite its inputs
# and temporaries in place. Without it, the divergence part is autograd-friendly: that is how the teacher
# gets a gradient when it needs one. gradcheck compares both gradient paths with finite differences.
# With a = log q, b = log p and a mixture m, the gradients with respect to a (taken as free variables;
# `_through_log_softmax` then maps g to g − q Σ g) are:
#   forward KL  Σ p (b − a)                      ∂/∂a = −p            (through log-softmax: q − p)
#   reverse KL  Σ q (a − b)                      ∂/∂a = q (a − b + 1) (through log-softmax: q (a − b − KL))
#   skew KL     Σ p (b − log m), m = λp + (1−λ)q ∂/∂a = −(1 − λ) p q / m
#   skew RKL    Σ q (a − log m), m = λq + (1−λ)p ∂/∂a = q (a − log m + 1 − λ q / m)
#   JSD(β)      β KL(p‖m) + (1−β) KL(q‖m)        ∂/∂a = (1 − β) q (a − log m),  m = βp + (1 − β)q
#   TV          ½ Σ |p − q|                      ∂/∂a = ½ sign(q − p) q
# --------------------------------------------------------------------------------------------

Kernel = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(a * b).sum(-1)` without the (N, V) product: (N, V), (N, V) -> (N,)."""
    return torch.einsum("nv,nv->n", a, b)


def _through_log_softmax(grad_logp: torch.Tensor, student_p: torch.Tensor) -> torch.Tensor:
    """Log-softmax backward, in place: gradient w.r.t. log-probabilities -> w.r.t. the (tempered) logits."""
    return grad_logp.addcmul_(student_p, grad_logp.sum(-1, keepdim=True), value=-1)


def _mixture(a: torch.Tensor, b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """`w·a + (1 − w)·b` for probabilities, floored at the smallest normal float so that its log is finite.

    Callers special-case the weights 0 and 1, so the mixture is at least `w·a` and `(1 − w)·b`: the floor
    only touches entries where both probabilities underflow, which contribute nothing.
    """
    return torch.lerp(b, a, weight_a).clamp_min(torch.finfo(a.dtype).tiny)


def _forward_kl_kernel(student_logp: torch.Tensor, teacher_logp: torch.Tensor, with_grad: bool):
    teacher_p = teacher_logp.exp()
    # b − a: in place when the kernel owns its inputs, one (N, V) temporary less on the commonest path
    log_ratio = teacher_logp.sub_(student_logp) if with_grad else teacher_logp - student_logp
    per_token = _rowwise_dot(teacher_p, log_ratio)
    return per_token, (student_logp.exp_().sub_(teacher_p) if with_grad else None)


def _reverse_kl_kernel(student_logp: torch.Tensor, teacher_logp: torch.Tensor, with_grad: bool):
    student_p = student_logp.exp()
    log_ratio = student_logp - teacher_logp
    per_token = _rowwise_dot(student_p, log_ratio)
    return per_token, (log_ratio.sub_(per_token[:, None]).mul_(student_p) if with_grad else None)


def _skew_forward_kl_kernel(student_logp, teacher_logp, with_grad: bool, *, skew_lambda: float):
    if skew_lambda == 0.0:
        return _forward_kl_kernel(student_logp, teacher_logp, with_grad)
    # The mixture depends on the student: the gradient flows through its (1 − λ)·q part. Detaching that
    # part (a common slip) leaves a loss whose gradient with respect to the student is zero.
    teacher_p, student_p = teacher_logp.exp(), student_logp.exp()
    mixture = _mixture(teacher_p, student_p, skew_lambda)
    per_token = _rowwise_dot(teacher_p, teacher_logp - mixture.log())
    if not with_grad:
        return per_token, None
    grad_logp = mixture.reciprocal_().mul_(teacher_p).mul_(student_p).mul_(skew_lambda - 1)
    return per_token, _through_log_softmax(grad_logp, student_p)


def _skew_reverse_kl_kernel(student_logp, teacher_logp, with_grad: bool, *, skew_lambda: float):
    if skew_lambda == 0.0:
        return _reverse_kl_kernel(student_logp, teacher_logp, with_grad)
    teacher_p, student_p = teacher_logp.exp(), student_logp.exp()
    mixture = _mixture(student_p, teacher_p, skew_lambda)
    log_ratio = student_logp - mixture.log()
    per_token = _rowwise_dot(student_p, log_ratio)
    if not with_grad:
        return per_token, None
    grad_logp = mixture.reciprocal_().mul_(student_p).mul_(-skew_lambda).add_(log_ratio).add_(1).mul_(student_p)
    return per_token, _through_log_softmax(grad_logp, student_p)


def _generalized_jsd_kernel(student_logp, teacher_logp, with_grad: bool, *, beta: float):
    # At β = 0 and β = 1 the mixture formula is identically 0; like TRL's GKD loss, the endpoints
    # are the KL divergences that JSD(β)/β and JSD(β)/(1 − β) tend to.
    if beta == 0.0:
        return _forward_kl_kernel(student_logp, teacher_logp, with_grad)
    if beta == 1.0:
        return _reverse_kl_kernel(student_logp, teacher_logp, with_grad)
    teacher_p, student_p = teacher_logp.exp(), student_logp.exp()
    log_mixture = _mixture(teacher_p, student_p, beta).log()
    student_log_ratio = student_logp - log_mixture
    teacher_term = _rowwise_dot(teacher_p, teacher_logp - log_mixture)
    per_token = beta * teacher_term + (1 - beta) * _rowwise_dot(student_p, student_log_ratio)
    if not with_grad:
        return per_token, None
    return per_token, _through_log_softmax(student_log_ratio.mul_(student_p).mul_(1 - beta), student_p)


def _total_variation_kernel(student_logp: torch.Tensor, teacher_logp: torch.Tensor, with_grad: bool):
    student_p = student_logp.exp()
    difference = student_p - teacher_logp.exp()
    per_token = 0.5 * difference.abs().sum(-1)
    if not with_grad:
        return per_token, None
    return per_token, _through_log_softmax(difference.sign_().mul_(student_p).mul_(0.5), student_p)


# --------------------------------------------------------------------------------------------
# Shared plumbing: validation, valid positions, the chunked sum and the reduction.
# --------------------------------------------------------------------------------------------


def _check_unit_interval(name: str, value: float) -> None:
    if not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")


def _check_run_args(temperature: float, chunk_size: int | None, num_items_in_batch) -> None:
    if not isinstance(temperature, Real) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive number of tokens or None (automatic), got {chunk_size!r}.")
    _check_num_items(num_items_in_batch)


def _check_num_items(num_items_in_batch: int | torch.Tensor | None) -> None:
    # A tensor is not inspected: reading it would synchronise the device on every step.
    if isinstance(num_items_in_batch, Real) and num_items_in_batch < 0:
        raise ValueError(
            f"`num_items_in_batch` must be >= 0 (the number of valid tokens in the whole accumulated batch), "
            f"got {num_items_in_batch!r}."
        )


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


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> int:
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


def _check_targets(targets: torch.Tensor, vocab: int) -> None:
    """Cross-entropy targets must be token ids of the student's vocabulary (or ignored)."""
    scored = targets[targets != IGNORE_INDEX]
    if scored.numel():
        low, high = torch.stack([scored.min(), scored.max()]).tolist()
        if low < 0 or high >= vocab:
            raise ValueError(
                f"`labels` must be token ids in [0, {vocab}) (the student's vocabulary) or {IGNORE_INDEX} (ignored); "
                f"got values from {low} to {high}."
            )


def _shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) next-token targets: position `t` is scored against label `t + 1`, as in Hugging Face's causal-LM
    loss, so the last position is always ignored."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def _valid_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of the positions whose *next* label is not ignored."""
    return _shifted_targets(labels) != IGNORE_INDEX


def _normaliser(
    num_valid: int | torch.Tensor, num_items_in_batch: int | torch.Tensor | None, device, dtype
) -> torch.Tensor:
    """`1 / count`: the local valid-token count, or the Trainer's `num_items_in_batch`."""
    count = num_valid if num_items_in_batch is None else num_items_in_batch
    count = torch.as_tensor(count, device=device, dtype=dtype).clamp_min(1)  # never divide by zero
    return count.reciprocal()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precisions, float64 stays float64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a stored gradient is kept in until backward applies the incoming gradient.

    float16 gradients stay float32 until then: under fp16 mixed precision the incoming gradient is GradScaler's
    scale (2^16 at first, `inf` in float16), and the small gradients of a softmax over a large vocabulary would
    underflow to zero if stored in float16 before it is applied. bfloat16 has float32's range.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def _apply_grad_output(grad: torch.Tensor | None, grad_output: torch.Tensor, dtype: torch.dtype):
    """A stored gradient times the incoming one, in the input's `dtype`. Plain `loss.backward()` hands back the
    stored tensor without another copy; any other factor is applied out of place, so that a retained graph can
    run backward again."""
    if grad is None:
        return None
    if not torch.equal(grad_output, torch.ones_like(grad_output)):
        grad = grad * grad_output.to(grad.dtype)
    return grad.to(dtype)


def _default_chunk_size(vocab: int, device: torch.device) -> int:
    elements = CPU_CHUNK_ELEMENTS if device.type == "cpu" else DEFAULT_CHUNK_ELEMENTS
    return -(-elements // vocab)  # ceil: at least that many logits per chunk


def _token_chunks(valid: torch.Tensor, chunk_size: int) -> list[tuple[slice | torch.Tensor, torch.Tensor | None]]:
    """The chunks of flattened `(batch · seq_len)` positions a loss walks, as `(index, mask)` pairs.

    A mostly valid batch (packed data has one invalid position per row) is walked densely in contiguous
    slices: each chunk of logits is then a view, with no gather copy on the way in and no scatter of its
    gradient on the way out; `mask` marks the chunk's valid positions, the others are computed and
    discarded. A sparse batch (prompt-masked instruction data) gathers its valid positions (`mask=None`).
    """
    flat = valid.reshape(-1)
    if 2 * int(flat.sum()) >= flat.numel():
        starts = range(0, flat.numel(), chunk_size)
        return [(slice(start, start + chunk_size), flat[start : start + chunk_size]) for start in starts]
    return [(index, None) for index in flat.nonzero().squeeze(1).split(chunk_size)]


def _masked_sum(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return (per_token if mask is None else torch.where(mask, per_token, 0)).sum()


def _cross_entropy_chunk(logits: torch.Tensor, targets: torch.Tensor, with_grad: bool):
    """`(n, V)` float logits and `(n,)` targets -> `(n,)` cross-entropies and, when `with_grad`, their gradient
    with respect to the logits, `softmax − one_hot`. Rows of ignored targets hold garbage: callers mask them."""
    targets = targets.clamp(0, logits.size(-1) - 1)[:, None]
    log_normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
    per_token = (log_normaliser - logits.gather(1, targets)).squeeze(1)
    if not with_grad:
        return per_token, None
    softmax = torch.sub(logits, log_normaliser).exp_()
    return per_token, softmax.scatter_add_(1, targets, torch.full_like(log_normaliser, -1))


def _autograd_chunk(kernel: Kernel, student, teacher, targets, mask, temperature, weights, scale, student_needs_grad):
    """A chunk's sums and gradients by autograd: the path taken when the teacher needs a gradient too."""
    kd_weight, ce_weight = weights
    student = student.detach().requires_grad_(student_needs_grad)
    teacher = teacher.detach().requires_grad_()
    with torch.enable_grad():
        student_logp = F.log_softmax(student / temperature, dim=-1)
        teacher_logp = F.log_softmax(teacher / temperature, dim=-1)
        kd = _masked_sum(kernel(student_logp, teacher_logp, False)[0], mask)
        objective, ce = kd_weight * kd, None
        if ce_weight is not None:
            ce = _masked_sum(_cross_entropy_chunk(student, targets, False)[0], mask)
            objective = objective + ce_weight * ce
    wanted = (student, teacher) if student_needs_grad else (teacher,)
    grads = torch.autograd.grad(objective, wanted, grad_outputs=scale)
    return kd.detach(), None if ce is None else ce.detach(), (grads[0] if student_needs_grad else None), grads[-1]


class _ChunkedLoss(torch.autograd.Function):
    """`(kd_weight · Σ divergence + ce_weight · Σ CE) · scale` over token chunks, gradients computed chunk by chunk.

    Forward computes each chunk's divergence (and the student's cross-entropy, unless `ce_weight` is None) and,
    right away, the gradient of the weighted, normalised chunk sum with respect to the chunk's logits, written
    into a gradient tensor shaped like the logits. Backward only scales that tensor by the incoming gradient.
    Returns the loss and, detached, the normalised divergence and cross-entropy (0 when not computed).
    """

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        kernel: Kernel,
        temperature: float,
        chunk_size: int,
        scale: torch.Tensor,
        weights: tuple[float, float | None],
        student_needs_grad: bool,
        teacher_needs_grad: bool,
    ):
        kd_weight, ce_weight = weights
        vocab = student_logits.size(-1)
        dtype = _compute_dtype(student_logits.dtype)
        valid = targets != IGNORE_INDEX
        flat_student = student_logits.reshape(-1, vocab)
        flat_teacher = teacher_logits.reshape(-1, teacher_logits.size(-1))
        flat_targets = targets.reshape(-1)
        student_grad = teacher_grad = None
        if student_needs_grad:
            # The logits' gradient, in their own dtype (see `_gradient_dtype`): memory their backward needs anyway.
            student_grad = flat_student.new_empty(flat_student.shape, dtype=_gradient_dtype(student_logits.dtype))
        if teacher_needs_grad:
            teacher_grad = torch.zeros_like(flat_teacher, dtype=_gradient_dtype(teacher_logits.dtype))
        kd_total = torch.zeros((), dtype=dtype, device=student_logits.device)
        ce_total = torch.zeros_like(kd_total)

        # Autocast would run the kernels' row-wise dot products (bmm) in half precision: keep float32.
        with torch.autocast(student_logits.device.type, enabled=False):
            for index, mask in _token_chunks(valid, chunk_size):
                student = flat_student[index].to(dtype)  # a view when contiguous and already float32
                teacher = flat_teacher[index, :vocab].to(dtype)
                chunk_targets = flat_targets[index]
                if teacher_needs_grad:
                    kd, ce, chunk_student_grad, chunk_teacher_grad = _autograd_chunk(
                        kernel, student, teacher, chunk_targets, mask, temperature, weights, scale, student_needs_grad
                    )
                    teacher_grad[index, :vocab] = chunk_teacher_grad.to(teacher_grad.dtype)
                else:
                    tempered = (
                        (student, teacher) if temperature == 1.0 else (student / temperature, teacher / temperature)
                    )
                    student_logp, teacher_logp = (F.log_softmax(logits, dim=-1) for logits in tempered)
                    del tempered
                    per_token, chunk_student_grad = kernel(student_logp, teacher_logp, student_needs_grad)
                    kd = _masked_sum(per_token, mask)
                    del student_logp, teacher_logp
                    ce, ce_grad_wanted = None, student_needs_grad and ce_weight not in (None, 0)
                    if ce_weight is not None:
                        per_token, ce_grad = _cross_entropy_chunk(student, chunk_targets, ce_grad_wanted)
                        ce = _masked_sum(per_token, mask)
                    if student_needs_grad:
                        # Chain rule through z / T, the term's weight and the normaliser.
                        chunk_student_grad.mul_(scale * (kd_weight / temperature))
                        if ce_grad_wanted:
                            chunk_student_grad.addcmul_(ce_grad, scale * ce_weight)
                            del ce_grad
                if student_needs_grad:
                    student_grad[index] = chunk_student_grad.to(student_grad.dtype)
                    del chunk_student_grad  # free before the next chunk allocates
                kd_total += kd
                if ce is not None:
                    ce_total += ce

        invalid = (~valid.reshape(-1)).nonzero().squeeze(1)  # row indices: a boolean mask would sweep all rows
        if student_grad is not None:
            student_grad[invalid] = 0  # dense chunks wrote garbage there, sparse ones nothing
            student_grad = student_grad.view(student_logits.shape)
        if teacher_grad is not None:
            teacher_grad[invalid] = 0
            teacher_grad = teacher_grad.view(teacher_logits.shape)
        ctx.save_for_backward(student_grad, teacher_grad)
        ctx.dtypes = (student_logits.dtype, teacher_logits.dtype)
        kd, ce = kd_total * scale, ce_total * scale
        loss = kd_weight * kd if ce_weight is None else kd_weight * kd + ce_weight * ce
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor, _kd_grad, _ce_grad):
        student_grad, teacher_grad = (
            _apply_grad_output(grad, grad_output, dtype) for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes)
        )
        return student_grad, teacher_grad, None, None, None, None, None, None, None, None


_KERNELS: dict[str, tuple[Callable[..., tuple[torch.Tensor, torch.Tensor | None]], dict[str, float]]] = {
    "forward_kl": (_forward_kl_kernel, {}),
    "reverse_kl": (_reverse_kl_kernel, {}),
    "skew_forward_kl": (_skew_forward_kl_kernel, {"skew_lambda": 0.1}),
    "skew_reverse_kl": (_skew_reverse_kl_kernel, {"skew_lambda": 0.1}),
    "generalized_jsd": (_generalized_jsd_kernel, {"beta": 0.5}),
    "total_variation": (_total_variation_kernel, {}),
}
"""Divergence name -> (kernel, its own parameters with their defaults)."""


def _kernel_for(divergence: str, params: dict) -> Kernel:
    """The kernel of `divergence` with its own parameters bound, validated."""
    if divergence not in _KERNELS:
        raise ValueError(f"Unknown divergence {divergence!r}; choose one of {sorted(_KERNELS)}.")
    kernel, defaults = _KERNELS[divergence]
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(
            f"{divergence} takes no parameter {sorted(unknown)}; its own parameters are {sorted(defaults) or 'none'}."
        )
    values = {**defaults, **params}
    for name, value in values.items():
        _check_unit_interval(name, value)  # skew_lambda and beta both live in [0, 1]
    return partial(kernel, **{name: float(value) for name, value in values.items()}) if values else kernel


def _chunked_loss(
    kernel: Kernel,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    num_items_in_batch: int | torch.Tensor | None,
    chunk_size: int | None,
    weights: tuple[float, float | None] = (1.0, None),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, then run `_ChunkedLoss` over the valid positions: (loss, divergence, cross-entropy)."""
    vocab = _check_logits(student_logits, teacher_logits, labels)
    _check_run_args(temperature, chunk_size, num_items_in_batch)

    targets = _shifted_targets(labels.to(student_logits.device))
    if weights[1] is not None:
        _check_targets(targets, student_logits.size(-1))
    num_valid = targets.ne(IGNORE_INDEX).sum()
    scale = _normaliser(num_valid, num_items_in_batch, student_logits.device, _compute_dtype(student_logits.dtype))
    grad_enabled = torch.is_grad_enabled()
    return _ChunkedLoss.apply(
        student_logits,
        teacher_logits,
        targets,
        kernel,
        float(temperature),
        chunk_size or _default_chunk_size(vocab, student_logits.device),
        scale,
        weights,
        grad_enabled and student_logits.requires_grad,
        grad_enabled and teacher_logits.requires_grad,
    )


def _divergence(kernel: Kernel, *args) -> torch.Tensor:
    return _chunked_loss(kernel, *args)[0]


# --------------------------------------------------------------------------------------------
# Public logit divergences.
# --------------------------------------------------------------------------------------------

_COMMON_ARGS = """
    Args:
        student_logits: `(batch, seq_len, vocab)` logits of the student, unshifted.
        teacher_logits: `(batch, seq_len, vocab_t)` logits of the teacher; `vocab_t` may exceed the student's
            vocabulary by padding rows only (they are sliced off, see `MAX_PADDING_ROWS`).
        labels: `(batch, seq_len)` labels as a causal LM receives them: position `t` is scored against label
            `t + 1`; positions whose shifted label is `-100` are ignored.
        temperature: softmax temperature `T` applied to both logits. The result is *not* multiplied by `T²`.
        num_items_in_batch: when given, the sum over valid tokens is divided by it instead of the local count
            (the `Trainer` convention under gradient accumulation).
        chunk_size: tokens per chunk; `None` picks about 2M logits per chunk on CPU, 8M on accelerators (see
            `CPU_CHUNK_ELEMENTS`). Results do not depend on it.

    Returns:
        A scalar tensor (float32 for half-precision inputs). A batch without valid tokens gives 0 with a
        gradient path (zero gradients), never NaN."""


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    return _divergence(
        _forward_kl_kernel, student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size
    )


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    return _divergence(
        _reverse_kl_kernel, student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size
    )


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    skew_lambda: float = 0.1,
) -> torch.Tensor:
    kernel = _kernel_for("skew_forward_kl", {"skew_lambda": skew_lambda})
    return _divergence(kernel, student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size)


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    skew_lambda: float = 0.1,
) -> torch.Tensor:
    kernel = _kernel_for("skew_reverse_kl", {"skew_lambda": skew_lambda})
    return _divergence(kernel, student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    kernel = _kernel_for("generalized_jsd", {"beta": beta})
    return _divergence(kernel, student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size)


def total_variation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    return _divergence(
        _total_variation_kernel, student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size
    )


forward_kl.__doc__ = "Forward KL `KL(p ‖ q)` (Hinton et al. 2015), mean over valid tokens.\n" + _COMMON_ARGS
reverse_kl.__doc__ = "Reverse KL `KL(q ‖ p)` (MiniLLM, Gu et al. 2024), mean over valid tokens.\n" + _COMMON_ARGS
skew_forward_kl.__doc__ = (
    "Skew forward KL `KL(p ‖ λp + (1 − λ)q)` (DistiLLM, Ko et al. 2024), mean over valid tokens.\n\n"
    "    `skew_lambda` is DistiLLM's λ, the weight of the *teacher* in the mixture (the book's skew weight `s`\n"
    "    on the student is `1 − λ`). `skew_lambda=0` is plain forward KL; `skew_lambda=1` gives 0.\n" + _COMMON_ARGS
)
skew_reverse_kl.__doc__ = (
    "Skew reverse KL `KL(q ‖ λq + (1 − λ)p)` (DistiLLM, Ko et al. 2024), mean over valid tokens.\n\n"
    "    `skew_lambda` is DistiLLM's λ, the weight of the distribution on the left of the KL (here the student)\n"
    "    in the mixture, so `skew_lambda=0` is plain reverse KL and `skew_lambda=1` gives 0.\n" + _COMMON_ARGS
)
generalized_jsd.__doc__ = (
    "Generalized JSD `β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)`, `m = βp + (1 − β)q` (GKD, Agarwal et al. 2024).\n\n"
    "    As in TRL, `beta=0` is forward KL `KL(p ‖ q)` and `beta=1` is reverse KL `KL(q ‖ p)` (the mixture\n"
    "    formula itself vanishes at both ends). `beta=0.5` is the symmetric Jensen-Shannon divergence.\n"
    + _COMMON_ARGS
)
total_variation.__doc__ = "Total variation distance `½ Σ |p − q|`, mean over valid tokens.\n" + _COMMON_ARGS

DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": total_variation,
}
"""Divergence name -> function, all called as `fn(student_logits, teacher_logits, labels, *, temperature=,
num_items_in_batch=, chunk_size=, ...)`; the skew ones also take `skew_lambda=`, `generalized_jsd` takes `beta=`."""


class DistillationLoss(NamedTuple):
    """What `distillation_loss` returns."""

    loss: torch.Tensor
    """`ce_weight · ce + kd_weight · kd`, differentiable."""
    ce: torch.Tensor
    """The student's mean cross-entropy on the labels, detached (for logging)."""
    kd: torch.Tensor
    """The mean divergence at temperature `T` (without `T²`), detached (for logging)."""


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    **divergence_params: float,
) -> DistillationLoss:
    """`ce_weight · CE(student, labels) + kd_weight · divergence(teacher ‖ student)` in one pass over the logits.

    Equal, values and gradients, to `ce_weight * F.cross_entropy(...)` (Hugging Face's causal-LM loss: shifted
    labels, `-100` ignored, float32, divided by the valid tokens or `num_items_in_batch`) plus `kd_weight *
    DIVERGENCES[divergence](...)`, but each chunk of logits is read once for both terms and the logits receive a
    single gradient tensor: no separate cross-entropy pass, no second `(batch, seq_len, vocab)` gradient to add
    up. The `DistillationTrainer` uses it for its `alpha·CE + beta·T²·KD` (with `kd_weight = beta·T²`).

    Args:
        student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size: as in `forward_kl`;
            the cross-entropy is taken at temperature 1 over the student's whole vocabulary.
        divergence: a key of `DIVERGENCES`.
        ce_weight, kd_weight: finite weights >= 0. With `ce_weight = 0` the cross-entropy is still reported, but
            its gradient is not computed.
        **divergence_params: `skew_lambda=` for the skew divergences, `beta=` for `generalized_jsd`.
    """
    kernel = _kernel_for(divergence, divergence_params)
    for name, weight in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"`{name}` must be a finite number >= 0, got {weight!r}.")
    weights = (float(kd_weight), float(ce_weight))
    loss, kd, ce = _chunked_loss(
        kernel, student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size, weights
    )
    return DistillationLoss(loss=loss, ce=ce, kd=kd)


# --------------------------------------------------------------------------------------------
# Fused variant: from the student's last hidden states and lm_head, never storing its full logits.
# --------------------------------------------------------------------------------------------


class _FusedLinearDivergence(torch.autograd.Function):
    """`_ChunkedLoss` (divergence only) with the student's lm_head inside the chunk loop (as Liger's fused linear
    losses): each chunk's logits are computed, used and dropped, and the chunk's gradient goes straight
    to the hidden states, the weight and the bias. No (B, T, V) tensor exists for the student at all."""

    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        teacher_logits: torch.Tensor,
        valid: torch.Tensor,
        kernel: Kernel,
        temperature: float,
        chunk_size: int,
        scale: torch.Tensor,
        needs_grad: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        vocab = weight.size(0)
        compute_dtype = _compute_dtype(hidden_states.dtype)
        batch_index, position_index = valid.nonzero(as_tuple=True)  # (N,), (N,)
        hidden_grad = weight_grad = bias_grad = None
        if needs_grad[0]:
            hidden_grad = torch.empty_like(hidden_states, dtype=_gradient_dtype(hidden_states.dtype))
            hidden_grad[~valid] = 0
        # Weight and bias gradients sum over chunks: accumulate them in float32.
        if needs_grad[1]:
            weight_grad = torch.zeros_like(weight, dtype=_compute_dtype(weight.dtype))
        if needs_grad[2]:
            bias_grad = torch.zeros_like(bias, dtype=_compute_dtype(bias.dtype))
        total = torch.zeros((), dtype=compute_dtype, device=hidden_states.device)

        # Autocast would run the kernels' row-wise dot products (bmm) in half precision: keep float32. The
        # lm_head then runs in its weight's dtype.
        with torch.autocast(hidden_states.device.type, enabled=False):
            for rows, cols in zip(batch_index.split(chunk_size), position_index.split(chunk_size)):
                hidden = hidden_states[rows, cols]  # (B, T, H) -> (n, H)
                logits = F.linear(hidden, weight, bias).to(compute_dtype)  # (n, V), as the unfused lm_head + upcast
                student_logp = F.log_softmax(logits.div_(temperature) if temperature != 1.0 else logits, dim=-1)
                del logits
                teacher_chunk = teacher_logits[rows, cols, :vocab].to(compute_dtype)  # a copy: safe to scale in place
                teacher_logp = F.log_softmax(teacher_chunk.div_(temperature), dim=-1)
                per_token, grad = kernel(student_logp, teacher_logp, any(needs_grad))
                total += per_token.sum()
                if grad is None:
                    continue
                del student_logp, teacher_logp
                grad_logits = grad.mul_(scale / temperature).to(weight.dtype)  # dL/dlogits, (n, V)
                if hidden_grad is not None:
                    hidden_grad[rows, cols] = (grad_logits @ weight).to(hidden_grad.dtype)  # (n, V) @ (V, H)
                if weight_grad is not None and weight_grad.dtype == weight.dtype:
                    weight_grad.addmm_(grad_logits.T, hidden)  # (V, n) @ (n, H), without a (V, H) temporary
                elif weight_grad is not None:
                    weight_grad += grad_logits.T @ hidden.to(weight.dtype)  # half-precision weight, float32 sum
                if bias_grad is not None:
                    bias_grad += grad_logits.sum(0)
                del grad, grad_logits

        if weight_grad is not None:
            weight_grad = weight_grad.to(_gradient_dtype(weight.dtype))
        if bias_grad is not None:
            bias_grad = bias_grad.to(_gradient_dtype(bias.dtype))
        ctx.save_for_backward(hidden_grad, weight_grad, bias_grad)
        ctx.dtypes = tuple(None if tensor is None else tensor.dtype for tensor in (hidden_states, weight, bias))
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        grads = [_apply_grad_output(grad, grad_output, dtype) for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None)


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
    kernel = _kernel_for(divergence, divergence_params)
    if student_hidden_states.dim() != 3 or not student_hidden_states.is_floating_point():
        raise ValueError(
            "`student_hidden_states` must be a floating-point tensor of shape (batch, seq_len, hidden), got "
            f"{student_hidden_states.dtype} of shape {tuple(student_hidden_states.shape)}."
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.size(1) != student_hidden_states.size(-1):
        raise ValueError(
            f"`lm_head_weight` must be (vocab, hidden) with hidden = {student_hidden_states.size(-1)} (the hidden "
            f"states' width), got shape {tuple(lm_head_weight.shape)}."
        )
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (lm_head_weight.size(0),):
        raise ValueError(f"`lm_head_bias` must be ({lm_head_weight.size(0)},), got {tuple(lm_head_bias.shape)}.")
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "`teacher_logits` requires a gradient, which the fused loss does not propagate: pass "
            "`teacher_logits.detach()`, or use the unfused functions of `DIVERGENCES`."
        )
    student_shape = (*student_hidden_states.shape[:2], lm_head_weight.size(0))
    # A zero-stride stand-in for the student logits: validated like them, without allocating them.
    _check_logits(student_hidden_states.new_empty(()).expand(student_shape), teacher_logits, labels)
    _check_run_args(temperature, chunk_size, num_items_in_batch)

    valid = _valid_mask(labels.to(student_hidden_states.device))
    compute_dtype = _compute_dtype(student_hidden_states.dtype)
    scale = _normaliser(valid.sum(), num_items_in_batch, student_hidden_states.device, compute_dtype)
    grad_enabled = torch.is_grad_enabled()
    needs_grad = tuple(
        grad_enabled and tensor is not None and tensor.requires_grad
        for tensor in (student_hidden_states, lm_head_weight, lm_head_bias)
    )
    return _FusedLinearDivergence.apply(
        student_hidden_states,
        lm_head_weight,
        lm_head_bias,
        teacher_logits,
        valid,
        kernel,
        float(temperature),
        chunk_size or _default_chunk_size(lm_head_weight.size(0), student_hidden_states.device),
        scale,
        needs_grad,
    )


# --------------------------------------------------------------------------------------------
# Hidden-state losses.
# --------------------------------------------------------------------------------------------

Projectors = Sequence[Callable[[torch.Tensor], torch.Tensor] | None] | Mapping[int | str, Callable] | nn.Module


def _normalise_layer_map(layer_map: Sequence[int] | Mapping[int, int], num_student: int, num_teacher: int):
    """`layer_map` as sorted `(student_block, teacher_block)` pairs, validated."""
    if isinstance(layer_map, Mapping):
        pairs = sorted((int(s), int(t)) for s, t in layer_map.items())
    elif isinstance(layer_map, Sequence) and not isinstance(layer_map, str):
        if len(layer_map) != num_student:
            raise ValueError(
                f"`layer_map` has {len(layer_map)} entries but the student has {num_student} blocks: give one teacher "
                "block per student block, or a dict {student_block: teacher_block} to align only some blocks."
            )
        pairs = [(i, int(t)) for i, t in enumerate(layer_map)]
    else:
        raise ValueError(f"`layer_map` must be a list of teacher block indices or a dict, got {type(layer_map)}.")
    if not pairs:
        raise ValueError("`layer_map` is empty: map at least one student block to a teacher block.")
    for student_block, teacher_block in pairs:
        if not 0 <= student_block < num_student:
            raise ValueError(
                f"`layer_map` names student block {student_block}, but the student has {num_student} blocks "
                f"(valid indices 0..{num_student - 1})."
            )
        if not 0 <= teacher_block < num_teacher:
            raise ValueError(
                f"`layer_map` maps student block {student_block} to teacher block {teacher_block}, but the teacher "
                f"has {num_teacher} blocks (valid indices 0..{num_teacher - 1}). Block indices are 0-based."
            )
    return pairs


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
    return states.to(_compute_dtype(states.dtype))


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
    pairs = _normalise_layer_map(layer_map, num_student, num_teacher)
    _check_num_items(num_items_in_batch)

    batch_index, position_index = _valid_mask(labels.to(student_hidden_states[0].device)).nonzero(as_tuple=True)
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
    scale = _normaliser(batch_index.numel(), num_items_in_batch, student.device, student.dtype)
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
    pairs = _normalise_layer_map(layer_map, num_student, num_teacher)
    if len(pairs) < 2:
        raise ValueError(
            f"`feature_dynamics_loss` compares consecutive student blocks but `layer_map` maps only {len(pairs)}; "
            "map at least two student blocks."
        )
    _check_num_items(num_items_in_batch)

    batch_index, position_index = _valid_mask(labels.to(student_hidden_states[0].device)).nonzero(as_tuple=True)

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
    scale = _normaliser(batch_index.numel(), num_items_in_batch, student.device, student.dtype)
    return torch.stack(token_sums).mean() * scale
