"""The one chunk engine every logit loss runs on.

`chunked_loss` walks the valid token positions in chunks and, for each chunk, computes the divergence (and the
student's cross-entropy) in float32 together with its gradient with respect to the chunk's student logits, as
Liger-Kernel's chunked losses do. Backward only scales the stored gradients, so neither pass holds float32
`(tokens, vocab)` tensors for more than one chunk.

The two sides of a chunk come from *sources*. The student's:
- `StudentLogits`: the student's logits, given whole; a chunk is a view and its gradient is written into one
  tensor shaped like the logits.
- `StudentHead`: the student's final hidden states and its lm_head; each chunk's logits are computed, used and
  dropped, and the chunk's gradient goes straight to the hidden states, the weight and the bias, so the student's
  `(batch, seq_len, vocab)` logits never exist.

and the teacher's: `TeacherLogits` (whole logits, sliced per chunk), `TeacherHead` (its final hidden states and
lm_head, each chunk's logits computed and dropped) or `TeacherTopK` (a cached top-k teacher: each chunk is a
sparse target, the top-k ids and the teacher's log-probabilities on them and on one tail bucket; see `topk`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..constants import IGNORE_INDEX
from .kernels import Kernel, cross_entropy_chunk
from .topk import BucketedTarget, bucketed_divergence, teacher_bucket_logp

DEFAULT_CHUNK_ELEMENTS = 2**23
"""With `chunk_size=None` on an accelerator, chunks hold at least this many logits (32 MiB per float32
temporary): enough work per kernel launch that the chunk loop costs nothing next to the passes themselves."""

CPU_CHUNK_ELEMENTS = 2**21
"""With `chunk_size=None` on CPU, chunks hold at least this many logits (8 MiB per float32 temporary). On
Linux, glibc serves blocks above 32 MiB with a fresh `mmap` and unmaps them when freed, so every 32 MiB
temporary of every chunk costs 8k page faults: measured on 1024 × 49152 logits (CE + forward KL, forward
and backward, 2 cores), 2^23-logit chunks took 0.62-0.80 s and 350k page faults, 2^20-2^22 took 0.34-0.44 s
and only the 49k faults of the gradient tensor. Smaller blocks are recycled from the heap."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precisions, float64 stays float64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a stored gradient is kept in until backward applies the incoming gradient.

    float16 gradients stay float32 until then: under fp16 mixed precision the incoming gradient is GradScaler's
    scale (2^16 at first, `inf` in float16), and the small gradients of a softmax over a large vocabulary would
    underflow to zero if stored in float16 before it is applied. bfloat16 has float32's range.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def default_chunk_size(vocab: int, device: torch.device) -> int:
    elements = CPU_CHUNK_ELEMENTS if device.type == "cpu" else DEFAULT_CHUNK_ELEMENTS
    return -(-elements // vocab)  # ceil: at least that many logits per chunk


def token_chunks(valid: torch.Tensor, chunk_size: int) -> list[tuple[slice | torch.Tensor, torch.Tensor | None]]:
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


def _apply_grad_output(grad: torch.Tensor | None, grad_output: torch.Tensor, dtype: torch.dtype | None):
    """A stored gradient times the incoming one, in the input's `dtype`. Plain `loss.backward()` hands back the
    stored tensor without another copy; any other factor is applied out of place, so that a retained graph can
    run backward again."""
    if grad is None:
        return None
    if not torch.equal(grad_output, torch.ones_like(grad_output)):
        grad = grad * grad_output.to(grad.dtype)
    return grad.to(dtype)


# -- the student's side of a chunk ------------------------------------------------------------------------------


class StudentLogits:
    """The student's `(B, T, V)` logits: chunks are row views, the gradient one tensor shaped like the logits."""

    def __init__(self, logits: torch.Tensor):
        self.inputs = (logits,)
        self.vocab = logits.size(-1)
        self.dtype = logits.dtype
        self.device = logits.device
        self._flat = logits.reshape(-1, self.vocab)  # (B, T, V) -> (B·T, V)
        self._grad = None

    def start(self, needs_grad: tuple[bool, ...]) -> None:
        if needs_grad[0]:
            # The logits' gradient, in their own dtype (see `gradient_dtype`): memory their backward needs anyway.
            self._grad = self._flat.new_empty(self._flat.shape, dtype=gradient_dtype(self.dtype))

    def logits(self, index: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._flat[index].to(dtype)  # a view when contiguous and already in `dtype`

    def accumulate(self, index, grad: torch.Tensor, mask: torch.Tensor | None) -> None:
        # Rows outside `mask` hold garbage here; `finish` zeroes every invalid row once.
        self._grad[index] = grad.to(self._grad.dtype)

    def finish(self, invalid: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if self._grad is None:
            return (None,)
        self._grad[invalid] = 0  # dense chunks wrote garbage there, sparse ones nothing
        return (self._grad.view(self.inputs[0].shape),)


class _Head:
    """A model's final hidden states `(B, T, H)` and lm_head `(V, H)` (+ bias). `softcap` applies Gemma's final logit
    soft-capping, `cap · tanh(z / cap)`, to each chunk's logits."""

    def __init__(
        self,
        hidden_states: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        softcap: float | None = None,
    ):
        self.inputs = (hidden_states, weight, bias)
        self.softcap = softcap
        self._flat = hidden_states.reshape(-1, hidden_states.size(-1))  # (B, T, H) -> (B·T, H)


class StudentHead(_Head):
    """The student's side from its final hidden states and lm_head: a chunk's logits are computed from its hidden
    states, and its gradient flows on to the hidden states, the weight and the bias."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        hidden_states, weight, _ = self.inputs
        self.vocab = weight.size(0)
        self.dtype = hidden_states.dtype
        self.device = hidden_states.device
        self._grads: list[torch.Tensor | None] = [None, None, None]
        self._capped: torch.Tensor | None = None

    def start(self, needs_grad: tuple[bool, ...]) -> None:
        hidden, weight, bias = self.inputs
        if needs_grad[0]:
            self._grads[0] = torch.empty_like(self._flat, dtype=gradient_dtype(hidden.dtype))
        # The weight and bias gradients sum over chunks: accumulate them in float32.
        if needs_grad[1]:
            self._grads[1] = torch.zeros_like(weight, dtype=compute_dtype(weight.dtype))
        if needs_grad[2]:
            self._grads[2] = torch.zeros_like(bias, dtype=compute_dtype(bias.dtype))

    def logits(self, index: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        _, weight, bias = self.inputs
        logits = head_logits(self._flat[index], weight, bias, self.softcap, dtype)
        if self.softcap is not None and any(grad is not None for grad in self._grads):
            self._capped = logits  # tanh(z / cap) is needed again for the chunk's gradient
        return logits

    def accumulate(self, index, grad: torch.Tensor, mask: torch.Tensor | None) -> None:
        _, weight, _ = self.inputs
        if mask is not None:
            grad.masked_fill_(~mask[:, None], 0)  # garbage rows must not reach the weight's gradient
        if self.softcap is not None:  # through cap · tanh(z / cap): times 1 − tanh²
            grad.mul_(self._capped.div_(self.softcap).square_().neg_().add_(1))
            self._capped = None
        grad = grad.to(weight.dtype)  # dL/dlogits, (n, V)
        hidden_grad, weight_grad, bias_grad = self._grads
        if hidden_grad is not None:
            hidden_grad[index] = (grad @ weight).to(hidden_grad.dtype)  # (n, V) @ (V, H)
        if weight_grad is not None:
            hidden = self._flat[index]
            if weight_grad.dtype == weight.dtype:
                weight_grad.addmm_(grad.T, hidden)  # (V, n) @ (n, H), without a (V, H) temporary
            else:
                weight_grad += grad.T @ hidden.to(weight.dtype)  # half-precision weight, float32 sum
        if bias_grad is not None:
            bias_grad += grad.sum(0)

    def finish(self, invalid: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden_grad, weight_grad, bias_grad = self._grads
        hidden, weight, bias = self.inputs
        if hidden_grad is not None:
            hidden_grad[invalid] = 0  # sparse walks never wrote these rows
            hidden_grad = hidden_grad.view(hidden.shape)
        if weight_grad is not None:
            weight_grad = weight_grad.to(gradient_dtype(weight.dtype))
        if bias_grad is not None:
            bias_grad = bias_grad.to(gradient_dtype(bias.dtype))
        return hidden_grad, weight_grad, bias_grad


def head_logits(hidden, weight, bias, softcap: float | None, dtype: torch.dtype) -> torch.Tensor:
    """`(n, H)` hidden states through an lm_head (and Gemma's soft-capping) to `(n, V)` logits in `dtype`."""
    logits = F.linear(hidden, weight, bias).to(dtype)  # as the model's lm_head, then upcast
    if softcap is not None:
        logits = logits.div_(softcap).tanh_().mul_(softcap)
    return logits


# -- the teacher's side of a chunk --------------------------------------------------------------------------------


class TeacherLogits:
    """The teacher's `(B, T, V_t)` logits, given whole; `V_t` may exceed the student's vocabulary by padding rows."""

    def __init__(self, logits: torch.Tensor):
        self.inputs = (logits,)
        self._flat = logits.reshape(-1, logits.size(-1))  # (B, T, V_t) -> (B·T, V_t)

    def logits(self, index: slice | torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        return self._flat[index, :vocab].to(dtype)


class TeacherHead(_Head):
    """The teacher's side from its final hidden states and lm_head: its logits are computed chunk by chunk, never
    whole. A constant of the loss (no gradient)."""

    def logits(self, index: slice | torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        _, weight, bias = self.inputs
        bias = None if bias is None else bias[:vocab]
        return head_logits(self._flat[index], weight[:vocab], bias, self.softcap, dtype)  # padding rows skipped


class TeacherTopK:
    """A teacher given by its top-k tokens (`topk.TopKTeacher`): a chunk is a `BucketedTarget`, the top-k ids and
    the teacher's `(n, k + 1)` bucketed log-probabilities at `temperature`. A constant of the loss."""

    def __init__(
        self, token_ids: torch.Tensor, logprobs: torch.Tensor, tail_logmass: torch.Tensor, temperature: float
    ):
        self.inputs = (token_ids, logprobs, tail_logmass)
        self.temperature = temperature
        k = token_ids.size(-1)
        # (B, T, k) -> (B·T, k), (B, T) -> (B·T,)
        self._ids, self._logprobs = token_ids.reshape(-1, k), logprobs.reshape(-1, k)
        self._tail = tail_logmass.reshape(-1)

    def logits(self, index: slice | torch.Tensor, vocab: int, dtype: torch.dtype) -> BucketedTarget:
        logp = teacher_bucket_logp(self._logprobs[index].to(dtype), self._tail[index].to(dtype), self.temperature)
        return BucketedTarget(self._ids[index].long(), logp)


# -- the chunk loop -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """What `chunked_loss` computes: `(kd_weight · Σ divergence + ce_weight · Σ CE) · scale`.

    `ce_weight=None` skips the cross-entropy entirely; `ce_weight=0` still reports it, without its gradient.
    """

    kernel: Kernel
    temperature: float
    chunk_size: int
    kd_weight: float = 1.0
    ce_weight: float | None = None


def _autograd_chunk(spec: LossSpec, student, teacher, targets, mask, scale, student_needs_grad):
    """A chunk's sums and gradients by autograd: the path taken when the teacher needs a gradient too."""
    student = student.detach().requires_grad_(student_needs_grad)
    teacher = teacher.detach().requires_grad_()
    with torch.enable_grad():
        student_logp = F.log_softmax(student / spec.temperature, dim=-1)
        teacher_logp = F.log_softmax(teacher / spec.temperature, dim=-1)
        kd = _masked_sum(spec.kernel(student_logp, teacher_logp, False)[0], mask)
        objective, ce = spec.kd_weight * kd, None
        if spec.ce_weight is not None:
            ce = _masked_sum(cross_entropy_chunk(student, targets, False)[0], mask)
            objective = objective + spec.ce_weight * ce
    wanted = (student, teacher) if student_needs_grad else (teacher,)
    grads = torch.autograd.grad(objective, wanted, grad_outputs=scale)
    return kd.detach(), None if ce is None else ce.detach(), (grads[0] if student_needs_grad else None), grads[-1]


def _chunk_with_grad(spec: LossSpec, student, teacher, targets, mask, scale, student_needs_grad):
    """A chunk's sums and, when wanted, the gradient of its weighted, normalised sum w.r.t. the student logits."""
    if isinstance(teacher, BucketedTarget):  # a cached top-k teacher: the divergence on the bucketed support
        student_logp = F.log_softmax(student if spec.temperature == 1.0 else student / spec.temperature, dim=-1)
        per_token, grad = bucketed_divergence(spec.kernel, student_logp, *teacher, student_needs_grad)
        del student_logp
    else:
        tempered = (
            (student, teacher) if spec.temperature == 1.0 else (student / spec.temperature, teacher / spec.temperature)
        )
        student_logp, teacher_logp = (F.log_softmax(logits, dim=-1) for logits in tempered)
        del tempered
        per_token, grad = spec.kernel(student_logp, teacher_logp, student_needs_grad)
        del student_logp, teacher_logp
    kd = _masked_sum(per_token, mask)
    ce, ce_grad_wanted = None, student_needs_grad and spec.ce_weight not in (None, 0)
    if spec.ce_weight is not None:
        per_token, ce_grad = cross_entropy_chunk(student, targets, ce_grad_wanted)
        ce = _masked_sum(per_token, mask)
    if student_needs_grad:
        # Chain rule through z / T, the term's weight and the normaliser.
        grad.mul_(scale * (spec.kd_weight / spec.temperature))
        if ce_grad_wanted:
            grad.addcmul_(ce_grad, scale * spec.ce_weight)
    return kd, ce, grad


class _ChunkedLoss(torch.autograd.Function):
    """The loss of `LossSpec` over token chunks, gradients computed chunk by chunk during forward.

    Returns the loss and, detached, the normalised divergence and cross-entropy (0 when not computed).
    """

    @staticmethod
    def forward(ctx, spec, student, teacher, needs_grad, teacher_needs_grad, targets, scale, *tensors):
        student_needs_grad = any(needs_grad)
        vocab = student.vocab
        dtype = compute_dtype(student.dtype)
        valid = targets != IGNORE_INDEX
        flat_targets = targets.reshape(-1)
        student.start(needs_grad)
        teacher_grad = None
        if teacher_needs_grad:  # dense teacher logits only (see `chunked_loss`)
            (teacher_logits,) = teacher.inputs
            teacher_grad = torch.zeros(
                teacher_logits.shape[:-1].numel(),
                teacher_logits.size(-1),
                dtype=gradient_dtype(teacher_logits.dtype),
                device=teacher_logits.device,
            )
        kd_total = torch.zeros((), dtype=dtype, device=student.device)
        ce_total = torch.zeros_like(kd_total)

        # Autocast would run the kernels' row-wise dot products (bmm) in half precision: keep float32.
        with torch.autocast(student.device.type, enabled=False):
            for index, mask in token_chunks(valid, spec.chunk_size):
                student_logits = student.logits(index, dtype)
                teacher_logits = teacher.logits(index, vocab, dtype)
                chunk_targets = flat_targets[index]
                if teacher_needs_grad:
                    kd, ce, grad, chunk_teacher_grad = _autograd_chunk(
                        spec, student_logits, teacher_logits, chunk_targets, mask, scale, student_needs_grad
                    )
                    teacher_grad[index, :vocab] = chunk_teacher_grad.to(teacher_grad.dtype)
                else:
                    kd, ce, grad = _chunk_with_grad(
                        spec, student_logits, teacher_logits, chunk_targets, mask, scale, student_needs_grad
                    )
                del student_logits, teacher_logits
                if student_needs_grad:
                    student.accumulate(index, grad, mask)
                    del grad  # free before the next chunk allocates
                kd_total += kd
                if ce is not None:
                    ce_total += ce

        invalid = (~valid.reshape(-1)).nonzero().squeeze(1)  # row indices: a boolean mask would sweep all rows
        student_grads = student.finish(invalid)
        teacher_grads = [None] * len(teacher.inputs)
        if teacher_grad is not None:
            teacher_grad[invalid] = 0
            teacher_grads[0] = teacher_grad.view(teacher.inputs[0].shape)
        ctx.save_for_backward(*teacher_grads, *student_grads)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (*teacher.inputs, *student.inputs))
        kd, ce = kd_total * scale, ce_total * scale
        loss = spec.kd_weight * kd if spec.ce_weight is None else spec.kd_weight * kd + spec.ce_weight * ce
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor, _kd_grad, _ce_grad):
        grads = (_apply_grad_output(grad, grad_output, dtype) for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return None, None, None, None, None, None, None, *grads


StudentSource = StudentLogits | StudentHead
TeacherSource = TeacherLogits | TeacherHead | TeacherTopK


def chunked_loss(
    spec: LossSpec,
    student: StudentSource,
    teacher: TeacherSource,
    targets: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the chunk loop: `(loss, divergence, cross-entropy)`, the last two detached and normalised.

    `targets` are the shifted `(B, T)` next-token targets (`IGNORE_INDEX` where nothing is scored) and `scale`
    is `1 / count` of the reduction. Gradients flow to the student source's tensors and, when they require one,
    to dense teacher logits (a teacher head or a top-k teacher is a constant).
    """
    grad_enabled = torch.is_grad_enabled()
    needs_grad = tuple(grad_enabled and t is not None and t.requires_grad for t in student.inputs)
    teacher_needs_grad = grad_enabled and isinstance(teacher, TeacherLogits) and teacher.inputs[0].requires_grad
    return _ChunkedLoss.apply(
        spec, student, teacher, needs_grad, teacher_needs_grad, targets, scale, *teacher.inputs, *student.inputs
    )
