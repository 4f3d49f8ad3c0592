"""The one chunk engine every logit loss runs on.

`chunked_loss` walks the valid token positions in chunks and, for each chunk, computes the divergence (and the
student's cross-entropy) in float32 together with its gradient with respect to the chunk's student logits, as
Liger-Kernel's chunked losses do. Backward only scales the stored gradients, so neither pass holds float32
`(tokens, vocab)` tensors for more than one chunk.

The two sides of a chunk come from *sources*. The student's:
- `StudentLogits`: the student's logits, given whole; a chunk is a view and its gradient is written into one
  tensor shaped like the logits.
- `StudentHead`: the student's final hidden states and its lm_head; each block's logits are computed, used and
  dropped, and the block's gradient goes straight to the hidden states, the weight and the bias, so the student's
  `(batch, seq_len, vocab)` logits never exist.

The loop walks *blocks* of positions, and each block in chunks. A block is what an lm_head multiplies at once: a
head's matrix products want a few hundred rows to run at full speed (and each block rewrites the whole weight
gradient), while the divergence's elementwise passes want small chunks (see `CPU_CHUNK_ELEMENTS`). For whole
logits a block is one chunk.

and the teacher's: `TeacherLogits` (whole logits, sliced per chunk), `TeacherHead` (its final hidden states and
lm_head, each block's logits computed and dropped) or `TeacherTopK` (a cached top-k teacher: each chunk is a
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
Linux, glibc serves blocks above 32 MiB with a fresh `mmap` and unmaps them when freed, so a larger temporary
costs thousands of page faults in every chunk, forward and backward; smaller blocks are recycled from the heap.
Chunks of 8 MiB stay well below that threshold and are large enough for the loop to cost nothing."""


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


def head_matmul_dtype(weight: torch.Tensor) -> torch.dtype:
    """The type an lm_head source runs its matrix products in: bfloat16 under bfloat16 autocast on the weight's
    device (as the model's own `nn.Linear` would run them there), else the weight's own type.

    Only the products change: logits are upcast before any softmax, and the weight's gradient is summed in float32.
    float16 autocast keeps the weight's type, since a token's gradient (about 1 / tokens times a probability) would
    underflow in float16 before the loss scale is applied.
    """
    kind = weight.device.type
    autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    return torch.bfloat16 if weight.dtype == torch.float32 and autocast == torch.bfloat16 else weight.dtype


HEAD_BLOCK_TOKENS = 128
"""With automatic chunks, an lm_head source computes the logits of at least this many positions at once (the
divergence still walks them in chunks). The head's three matrix products (logits, hidden-state and weight
gradients) run far below the machine's peak on a few dozen rows, and every block reads and rewrites the
`(vocab, hidden)` weight gradient once; from 128 rows they come close to the whole-batch products."""


def default_chunk_size(vocab: int, device: torch.device) -> int:
    elements = CPU_CHUNK_ELEMENTS if device.type == "cpu" else DEFAULT_CHUNK_ELEMENTS
    return -(-elements // vocab)  # ceil: at least that many logits per chunk


def default_block_size(chunk_size: int, *sources) -> int | None:
    """Positions per block with automatic chunks: `HEAD_BLOCK_TOKENS` or more when a side is an lm_head."""
    if any(isinstance(source, _Head) for source in sources):
        return max(chunk_size, HEAD_BLOCK_TOKENS)
    return None


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


class _GivenWhole:
    """A source given whole: a block needs no preparation and leaves nothing behind."""

    def begin_block(self, *args) -> None:
        pass

    def end_block(self, *args) -> None:
        pass

    def release(self) -> None:
        pass


class StudentLogits(_GivenWhole):
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

    def logits(self, index: slice | torch.Tensor, local: slice, dtype: torch.dtype) -> torch.Tensor:
        return self._flat[index].to(dtype)  # a view when contiguous and already in `dtype`

    def accumulate(self, index, local: slice, grad: torch.Tensor) -> None:
        # Rows outside the chunk's mask hold garbage here; `finish` zeroes every invalid row once.
        self._grad[index] = grad.to(self._grad.dtype)

    def finish(self, invalid: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if self._grad is None:
            return (None,)
        self._grad[invalid] = 0  # dense chunks wrote garbage there, sparse ones nothing
        return (self._grad.view(self.inputs[0].shape),)


class _Head:
    """A model's final hidden states `(B, T, H)` and lm_head `(V, H)` (+ bias). `softcap` applies Gemma's final logit
    soft-capping, `cap · tanh(z / cap)`, to each chunk's logits. The head's products run in `head_matmul_dtype`,
    decided when the source is made (under the caller's autocast)."""

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
        self._buffers: dict[str, torch.Tensor] = {}
        self.matmul_dtype = head_matmul_dtype(weight)
        self._operands: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def operands(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias in `matmul_dtype`, cast once per loss (the weights themselves when already in it)."""
        if self._operands is None:
            _, weight, bias = self.inputs
            cast = self.matmul_dtype
            self._operands = (weight.to(cast), None if bias is None else bias.to(cast))
        return self._operands

    def _buffer(self, name: str, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
        """`(rows, columns)` memory that every block reuses: on CPU a fresh tensor above 32 MiB is a fresh `mmap`,
        whose page faults would be paid again by every block (see `CPU_CHUNK_ELEMENTS`)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size(0) < rows or buffer.dtype != dtype:
            buffer = self._buffers[name] = self._flat.new_empty((rows, columns), dtype=dtype)
        return buffer[:rows]

    def release(self) -> None:
        """Free the blocks' buffers (and the cast weight) once the loop is done."""
        self._buffers.clear()
        self._operands = None

    def _block_logits_of(self, index, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        """The block's `(n, vocab)` logits in `dtype`, computed as the model's lm_head does (then upcast) into the
        reused buffer, soft-capped when the model caps them."""
        weight, bias = self.operands()
        hidden, weight = self._flat[index], weight[:vocab]  # rows past `vocab` are the teacher's padding
        bias = None if bias is None else bias[:vocab]
        logits = self._buffer("logits", hidden.size(0), vocab, dtype)
        if weight.dtype == dtype and hidden.dtype == dtype:
            if bias is None:
                torch.mm(hidden, weight.T, out=logits)
            else:
                torch.addmm(bias, hidden, weight.T, out=logits)
        else:
            logits.copy_(F.linear(hidden.to(weight.dtype), weight, bias))  # in the head's precision, then upcast
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits


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
        self._block_logits: torch.Tensor | None = None  # the current block's, tanh(z / cap)·cap when soft-capped
        self._block_grad: torch.Tensor | None = None

    def start(self, needs_grad: tuple[bool, ...]) -> None:
        hidden, weight, bias = self.inputs
        if needs_grad[0]:
            self._grads[0] = torch.empty_like(self._flat, dtype=gradient_dtype(hidden.dtype))
        # The weight and bias gradients sum over chunks: accumulate them in float32.
        if needs_grad[1]:
            self._grads[1] = torch.zeros_like(weight, dtype=compute_dtype(weight.dtype))
        if needs_grad[2]:
            self._grads[2] = torch.zeros_like(bias, dtype=compute_dtype(bias.dtype))

    def begin_block(self, index, dtype: torch.dtype) -> None:
        self._block_logits = self._block_logits_of(index, self.vocab, dtype)
        self._block_grad = None

    def logits(self, index, local: slice, dtype: torch.dtype) -> torch.Tensor:
        return self._block_logits[local]

    def accumulate(self, index, local: slice, grad: torch.Tensor) -> None:
        if local.start == 0 and grad.size(0) == self._block_logits.size(0):
            self._block_grad = grad  # the block is one chunk: its gradient as it is
            return
        if self._block_grad is None:
            self._block_grad = self._buffer("grad", *self._block_logits.shape, grad.dtype)
        self._block_grad[local] = grad

    def end_block(self, index, mask: torch.Tensor | None) -> None:
        """The block's gradient (dL/dlogits, `(n, V)`) on to the hidden states, the weight and the bias."""
        weight, _ = self.operands()
        grad, capped = self._block_grad, self._block_logits
        self._block_grad = self._block_logits = None
        if grad is None:
            return
        if mask is not None:
            grad.masked_fill_(~mask[:, None], 0)  # garbage rows must not reach the weight's gradient
        if self.softcap is not None:  # through cap · tanh(z / cap): times 1 − tanh²
            grad.mul_(capped.div_(self.softcap).square_().neg_().add_(1))
        del capped
        hidden_grad, weight_grad, bias_grad = self._grads
        if bias_grad is not None:
            bias_grad += grad.sum(0)
        if weight_grad is not None:
            # In the accumulator's type, without a (V, H) temporary: a bfloat16 product would cost a (V, H) result
            # and its conversion per block, more than the float32 product it saves.
            hidden = self._flat[index]
            if weight_grad.dtype == hidden.dtype == grad.dtype:
                weight_grad.addmm_(grad.T, hidden)  # (V, n) @ (n, H)
            else:  # a half-precision model: its own type's product, summed in float32
                weight_grad += grad.to(weight.dtype).T @ hidden.to(weight.dtype)
        if hidden_grad is not None:
            hidden_grad[index] = (grad.to(weight.dtype) @ weight).to(hidden_grad.dtype)  # (n, V) @ (V, H)

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


# -- the teacher's side of a chunk --------------------------------------------------------------------------------


class TeacherLogits(_GivenWhole):
    """The teacher's `(B, T, V_t)` logits, given whole; `V_t` may exceed the student's vocabulary by padding rows."""

    def __init__(self, logits: torch.Tensor):
        self.inputs = (logits,)
        self._flat = logits.reshape(-1, logits.size(-1))  # (B, T, V_t) -> (B·T, V_t)

    def logits(self, index: slice | torch.Tensor, local: slice, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        return self._flat[index, :vocab].to(dtype)


class TeacherHead(_Head):
    """The teacher's side from its final hidden states and lm_head: its logits are computed chunk by chunk, never
    whole. A constant of the loss (no gradient)."""

    def begin_block(self, index, vocab: int, dtype: torch.dtype) -> None:
        self._block_logits = self._block_logits_of(index, vocab, dtype)

    def logits(self, index, local: slice, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        return self._block_logits[local]

    def end_block(self, *args) -> None:
        self._block_logits = None


class TeacherTopK(_GivenWhole):
    """A teacher given by its top-k tokens (`topk.TopKTeacher`): a chunk is a `BucketedTarget`, the top-k ids (and
    sampled tail ids) and the teacher's bucketed log-probabilities at `temperature`. A constant of the loss."""

    def __init__(
        self,
        token_ids: torch.Tensor,
        logprobs: torch.Tensor,
        tail_logmass: torch.Tensor,
        tail_ids: torch.Tensor | None = None,
        tail_share: torch.Tensor | None = None,
        *,
        temperature: float,
    ):
        self.inputs = (token_ids, logprobs, tail_logmass, tail_ids, tail_share)
        self.temperature = temperature
        k = token_ids.size(-1)
        # (B, T, k) -> (B·T, k), (B, T) -> (B·T,)
        self._ids, self._logprobs = token_ids.reshape(-1, k), logprobs.reshape(-1, k)
        self._tail = tail_logmass.reshape(-1)
        if tail_ids is not None:
            samples = tail_ids.size(-1)
            self._ids = torch.cat([self._ids, tail_ids.reshape(-1, samples).to(self._ids.dtype)], dim=-1)
            tail_share = tail_share.reshape(-1, samples)
        self._share = tail_share

    def logits(self, index: slice | torch.Tensor, local: slice, vocab: int, dtype: torch.dtype) -> BucketedTarget:
        share = None if self._share is None else self._share[index].to(dtype)
        tail = self._tail[index].to(dtype)
        logp = teacher_bucket_logp(self._logprobs[index].to(dtype), tail, self.temperature, share)
        return BucketedTarget(self._ids[index].long(), logp)


# -- the chunk loop -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """What `chunked_loss` computes: `(kd_weight · Σ divergence + ce_weight · Σ CE) · scale`.

    `ce_weight=None` skips the cross-entropy entirely; `ce_weight=0` still reports it, without its gradient.
    `block_size` (at least `chunk_size`) is how many positions an lm_head source computes at once; `None` means
    `chunk_size`.
    """

    kernel: Kernel
    temperature: float
    chunk_size: int
    kd_weight: float = 1.0
    ce_weight: float | None = None
    block_size: int | None = None


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


def _chunks_of(block: slice | torch.Tensor, mask: torch.Tensor | None, chunk_size: int):
    """A block's chunks as `(index, local, mask)`: positions in the flattened batch, rows of the block, and the
    chunk's part of the block's mask. A dense block is a slice whose mask covers it (the last one may be short)."""
    dense = isinstance(block, slice)
    length = len(mask) if dense else len(block)
    for start in range(0, length, chunk_size):
        local = slice(start, min(start + chunk_size, length))
        index = slice(block.start + local.start, block.start + local.stop) if dense else block[local]
        yield index, local, None if mask is None else mask[local]


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
            for block, block_mask in token_chunks(valid, spec.block_size or spec.chunk_size):
                student.begin_block(block, dtype)
                teacher.begin_block(block, vocab, dtype)
                for index, local, mask in _chunks_of(block, block_mask, spec.chunk_size):
                    student_logits = student.logits(index, local, dtype)
                    teacher_logits = teacher.logits(index, local, vocab, dtype)
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
                        student.accumulate(index, local, grad)
                        del grad  # free before the next chunk allocates
                    kd_total += kd
                    if ce is not None:
                        ce_total += ce
                student.end_block(block, block_mask)
                teacher.end_block(block, block_mask)

        student.release()
        teacher.release()
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
