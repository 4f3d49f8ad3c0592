"""A teacher given by its top-k tokens: the sparse target of distillation from a cache.

A cached teacher keeps, per position, its `k` most likely token ids, their log-probabilities at `T = 1`, and
for each temperature `T` it was cached at, `log Σ_tail p_v^(1/T)`: the tail's unnormalised mass at `T`. With
these, the teacher's distribution at `T` is known exactly on a support of `k + 1` outcomes, the top-k tokens
and one *tail bucket* (all the other tokens together):

    p_T(i)    = p_i^(1/T) / Z_T            for the top-k tokens i
    p_T(tail) = Σ_tail p_v^(1/T) / Z_T     Z_T = Σ_top p_i^(1/T) + Σ_tail p_v^(1/T)

(the top-k of `z / T` is the top-k of `z` for every `T`, so one set of ids serves every temperature). The
student's distribution is bucketed the same way, `q_T(tail) = 1 − Σ_top q_T(i)`, and a divergence of the table
is taken between the two `(k + 1)`-outcome distributions. Every divergence of the table (forward and reverse KL,
the skew KLs, generalized JSD, total variation) is an f-divergence (or a mixture of KLs), so by the
data-processing inequality the bucketed value is a *lower bound* of the full-vocabulary one, equal to it when
`k` is the whole vocabulary. For the two KLs the gap is exact, by the chain rule of KL:

    KL(p ‖ q) − KL_bucketed = p_T(tail) · KL(p_T(· | tail) ‖ q_T(· | tail))
    KL(q ‖ p) − KL_bucketed = q_T(tail) · KL(q_T(· | tail) ‖ p_T(· | tail))

and for total variation `0 ≤ TV − TV_bucketed ≤ min(p_T(tail), q_T(tail))`.

**Sampled tail** (Anshumann et al., 2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
who show that top-k targets bias the student). The bucket says how much mass the tail holds, not how it is
spread: within it, the student keeps its own shape. A cache may also hold `s` tokens drawn from the tail at a
sampling temperature `T_s` (`sample_tail`), deduplicated with their counts `c`; the tail's exact mass at `T` is
then split over them, token `j` getting the share `c_j · w_j / Σ c · w`, `w_j = p_j^(1/T − 1/T_s)` (importance
weights, all 1 at `T = T_s`), and the tail tokens nobody drew form the last bucket with teacher mass 0. At
`T = T_s` the expected target is the teacher's full distribution, so the forward-KL gradient `q − p̂` is an
unbiased estimate of the full-vocabulary one (self-normalised, hence consistent, at other `T`); the other
divergences are not linear in `p` and get a consistent, not unbiased, estimate.

Gradients: with `A_j = log q_T(bucket j)` a function of the student's tempered logits `u`, a kernel's gradient
`g_j` with respect to the bucket pseudo-logits (`A = log_softmax(w)`) maps back to the vocabulary as
`∂L/∂u_v = g_j(v) · q_T(v) / q_T(bucket of v)`: `g_i` itself on a top-k token (its bucket is itself) and
`g_tail · q_T(v) / q_T(tail)` on the others. So the dense kernels run unchanged on `(N, k + 1)` inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .kernels import Kernel
from .validation import ids_outside


class TopKTeacher(NamedTuple):
    """A teacher given by its top-k tokens (what `hf_recover.cache_teacher_outputs` stores), for one temperature,
    and optionally tokens sampled from its tail (see the module docstring)."""

    token_ids: torch.Tensor
    """`(batch, seq_len, k)` integer ids of the teacher's `k` most likely tokens, all distinct per position."""
    logprobs: torch.Tensor
    """`(batch, seq_len, k)` their log-probabilities at `T = 1`."""
    tail_logmass: torch.Tensor
    """`(batch, seq_len)` `log Σ_tail p_v^(1/T)` at the loss's temperature `T` (at `T = 1`, the log of the tail's
    probability); `-inf` (or very negative) when the top-k is the whole vocabulary."""
    tail_ids: torch.Tensor | None = None
    """`(batch, seq_len, s)` distinct tail tokens (none of the top-k) that receive a share of the tail's mass."""
    tail_share: torch.Tensor | None = None
    """`(batch, seq_len, s)` the log of each one's share of the tail mass at the loss's temperature (`tail_share`);
    `-inf` for a token nobody drew. Without them the tail is one bucket."""


_LOG_TINY = {
    dtype: float(torch.tensor(torch.finfo(dtype).tiny, dtype=torch.float64).log())
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
"""The smallest log-probability the bucketed kernels see, per dtype: an empty tail (`k` = vocabulary) becomes
`log(tiny)`, a probability of 0 to the last bit of the loss, instead of `-inf`, whose `0 · (−inf − −inf)` is NaN."""


def teacher_top_k(
    logits: torch.Tensor, k: int, temperatures: Sequence[float] = (1.0,), chunk_elements: int = 2**21
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(N, V)` teacher logits -> the top-k ids `(N, k)`, their log-probabilities at `T = 1` `(N, k)` and the
    tail's `log Σ_tail p_v^(1/T)` for each temperature `(N, len(temperatures))`, in float32 (ids int64).

    Rows are taken `chunk_elements` logits at a time: float32 temporaries of a whole batch's logits would each be
    a fresh `mmap` (see `chunking.CPU_CHUNK_ELEMENTS`), which made the tails cost ten times the log-softmax."""
    ids, top, tails = [], [], []
    for chunk in logits.split(max(1, chunk_elements // logits.size(-1))):
        chunk_top, chunk_ids = chunk.topk(k, dim=-1, sorted=True)  # the top-k of z is the top-k of log p
        chunk_top = chunk_top.float()
        shifted = chunk.float() - chunk_top[:, :1]  # z − max z <= 0, a new tensor: the logits stay untouched
        exp_shifted = shifted.exp()
        log_normaliser = exp_shifted.sum(-1, keepdim=True).log_()  # log Σ exp(z − max z)
        # Σ_tail p^(1/T) as a sum of its own small terms (1 − Σ top would cancel); an empty tail is log 0 = -inf.
        chunk_tails = []
        for temperature in temperatures:
            # at T = 1 the exponentials above, zeroed on the top-k in place: no other temperature reads them
            powered = exp_shifted if temperature == 1.0 else shifted.mul(1.0 / temperature).exp_()
            tail = powered.scatter_(1, chunk_ids, 0.0).sum(-1, keepdim=True).log_()
            chunk_tails.append(tail - log_normaliser / temperature)  # p^(1/T) = exp((z − max z − log Σ) / T)
        ids.append(chunk_ids)
        top.append(chunk_top - chunk_top[:, :1] - log_normaliser)
        tails.append(torch.cat(chunk_tails, dim=-1))
    return torch.cat(ids), torch.cat(top), torch.cat(tails)


def sample_tail(
    logits: torch.Tensor,
    top_ids: torch.Tensor,
    samples: int,
    temperature: float,
    generator: torch.Generator | None = None,
    chunk_elements: int = 2**21,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `samples` tokens per row from the teacher's tail (every token but `top_ids`) at `temperature`, with
    replacement: `(N, samples)` distinct ids (int64), their log-probabilities at `T = 1` (float32) and how often
    each was drawn (int64; the draws sum to `samples`). Rows with fewer distinct draws are filled with the most
    likely undrawn tail tokens, count 0."""
    ids, logprobs, counts = [], [], []
    rows = max(1, chunk_elements // logits.size(-1))
    for chunk, chunk_top in zip(logits.split(rows), top_ids.split(rows)):
        shifted = chunk.float()
        shifted = shifted - shifted.max(-1, keepdim=True).values
        log_normaliser = shifted.logsumexp(-1, keepdim=True)
        weights = shifted.div(temperature).exp_()  # p^(1/T), unnormalised
        weights.add_(torch.finfo(weights.dtype).tiny).scatter_(1, chunk_top, 0.0)  # never empty, never the top-k
        draws = torch.multinomial(weights, samples, replacement=True, generator=generator)
        # Rank by count, then by probability (a fraction below 1/2 orders ties without ever adding up to a draw).
        score = torch.zeros_like(weights).scatter_add_(1, draws, torch.ones_like(draws, dtype=weights.dtype))
        score.add_(weights.div_(weights.sum(-1, keepdim=True)).mul_(0.5)).scatter_(1, chunk_top, -1.0)
        chunk_score, chunk_ids = score.topk(samples, dim=-1)
        ids.append(chunk_ids)
        logprobs.append(shifted.gather(1, chunk_ids) - log_normaliser)
        counts.append(chunk_score.floor_().long())
    return torch.cat(ids), torch.cat(logprobs), torch.cat(counts)


def tail_share(
    counts: torch.Tensor, logprobs: torch.Tensor, temperature: float, sample_temperature: float
) -> torch.Tensor:
    """The log of each sampled tail token's share of the tail's mass at `temperature`, from its draw count and its
    log-probability at `T = 1` (drawn at `sample_temperature`): `log(c · w / Σ c · w)`, `w = p^(1/T − 1/T_s)`."""
    log_weights = counts.to(logprobs.dtype).log() + logprobs * (1.0 / temperature - 1.0 / sample_temperature)
    return log_weights - log_weights.logsumexp(-1, keepdim=True)


def teacher_bucket_logp(
    logprobs: torch.Tensor, tail_logmass: torch.Tensor, temperature: float, share: torch.Tensor | None = None
) -> torch.Tensor:
    """`(n, k)` log-probabilities at `T = 1` and `(n,)` tail log-mass at `T` -> `(n, k + 1)` log-probabilities of
    the teacher at `T` on the top-k tokens and the tail bucket. Renormalised here, so float16 storage error in the
    stored values never makes the bucketed distribution sum to anything but 1.

    With `share` (`(n, s)`, see `tail_share`) the tail's mass is split over `s` sampled tail tokens and the last
    bucket, the undrawn rest, has mass 0: `(n, k + s + 1)`."""
    floor = _LOG_TINY[logprobs.dtype]
    tail = tail_logmass.clamp_min(floor)[:, None]
    if share is None:
        joint = torch.cat([logprobs / temperature, tail], dim=-1)
    else:
        rest = torch.full_like(tail, floor)
        joint = torch.cat([logprobs / temperature, (tail + share).clamp_min_(floor), rest], dim=-1)
    return torch.log_softmax(joint, dim=-1).clamp_min_(floor)


def bucketed_divergence(
    kernel: Kernel,
    student_logp: torch.Tensor,
    token_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A dense kernel on the bucketed distributions: `(n,)` divergences and, when `with_grad`, their `(n, V)`
    gradient with respect to the tempered student logits (see the module docstring for the mapping).

    `student_logp` is `(n, V)` (consumed: it becomes the gradient), `token_ids` `(n, k)`, `teacher_logp` the
    `(n, k + 1)` output of `teacher_bucket_logp`."""
    floor = _LOG_TINY[student_logp.dtype]
    top = student_logp.gather(1, token_ids)  # (n, k)
    # The tail's mass as a sum of its own probabilities, not 1 − Σ top (which cancels when the top-k holds
    # nearly everything); an empty or underflowing tail is log(tiny).
    tail_p = student_logp.exp_().scatter_(1, token_ids, 0.0)  # (n, V), 0 on the top-k
    tail = tail_p.sum(-1, keepdim=True).log_().clamp_min_(floor)  # (n, 1)
    student_bucket = torch.cat([top, tail], dim=-1)
    per_token, bucket_grad = kernel(student_bucket, teacher_logp, with_grad)
    if not with_grad:
        return per_token, None
    k = token_ids.size(1)
    # q_T(v) / q_T(tail) · g_tail on the tail tokens (0 on the top-k, overwritten next)
    grad = tail_p.mul_(bucket_grad[:, k:] * tail.neg().exp_())
    return per_token, grad.scatter_(1, token_ids, bucket_grad[:, :k])


class BucketedTarget(NamedTuple):
    """A chunk's teacher side from a top-k teacher: what `bucketed_divergence` takes."""

    token_ids: torch.Tensor
    """`(n, k)` int64."""
    logp: torch.Tensor
    """`(n, k + 1)` the teacher's bucketed log-probabilities at the loss's temperature."""


def check_top_k_teacher(teacher: TopKTeacher, batch_shape: tuple[int, int], vocab: int) -> None:
    """Check a `TopKTeacher`: shapes and dtypes against the labels' `(batch, seq_len)`, ids against `vocab`."""
    token_ids, logprobs, tail = teacher.token_ids, teacher.logprobs, teacher.tail_logmass
    if token_ids.dim() != 3 or token_ids.is_floating_point() or token_ids.dtype == torch.bool:
        raise ValueError(
            f"TopKTeacher.token_ids must be an integer tensor (batch, seq_len, k), got {token_ids.dtype} of shape "
            f"{tuple(token_ids.shape)}."
        )
    if tuple(logprobs.shape) != tuple(token_ids.shape) or not logprobs.is_floating_point():
        raise ValueError(
            f"TopKTeacher.logprobs must be floating point and shaped like token_ids {tuple(token_ids.shape)}, got "
            f"{logprobs.dtype} of shape {tuple(logprobs.shape)}."
        )
    if tuple(tail.shape) != tuple(token_ids.shape[:2]) or not tail.is_floating_point():
        raise ValueError(
            f"TopKTeacher.tail_logmass must be floating point of shape {tuple(token_ids.shape[:2])} (batch, seq_len), "
            f"got {tail.dtype} of shape {tuple(tail.shape)}."
        )
    if tuple(token_ids.shape[:2]) != tuple(batch_shape):
        raise ValueError(
            f"The cached teacher's (batch, seq_len) {tuple(token_ids.shape[:2])} differs from the labels' "
            f"{tuple(batch_shape)}: the cache rows are not aligned with the batch."
        )
    if (teacher.tail_ids is None) != (teacher.tail_share is None):
        raise ValueError("TopKTeacher.tail_ids and tail_share go together: give both or neither.")
    if teacher.tail_ids is not None:
        samples = teacher.tail_ids
        if samples.is_floating_point() or tuple(samples.shape[:2]) != tuple(token_ids.shape[:2]) or samples.dim() != 3:
            raise ValueError(
                f"TopKTeacher.tail_ids must be an integer tensor (batch, seq_len, s) aligned with token_ids, got "
                f"{samples.dtype} of shape {tuple(samples.shape)}."
            )
        if tuple(teacher.tail_share.shape) != tuple(samples.shape) or not teacher.tail_share.is_floating_point():
            raise ValueError(
                f"TopKTeacher.tail_share must be floating point and shaped like tail_ids {tuple(samples.shape)}, got "
                f"{teacher.tail_share.dtype} of shape {tuple(teacher.tail_share.shape)}."
            )
        token_ids = torch.cat([token_ids, samples.to(token_ids.dtype)], dim=-1)  # ids checked together below
    k = token_ids.size(-1)
    if not 1 <= k <= vocab:
        raise ValueError(f"The cached teacher's top_k is {k}; it must lie in [1, {vocab}] (the student's vocabulary).")
    if outside := ids_outside(token_ids, vocab):
        raise ValueError(
            f"The cached teacher's token ids range from {outside[0]} to {outside[1]}, outside the student's "
            f"vocabulary [0, {vocab}): the cache was built with another tokenizer or teacher."
        )
