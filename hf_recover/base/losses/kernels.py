"""Per-token divergence kernels with hand-written gradients, and the student's per-token cross-entropy.

A kernel takes `(N, V)` log-probabilities of the tempered logits `z / T` and returns the `(N,)` per-token
divergences and, when asked, their `(N, V)` gradient with respect to the tempered student logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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


def forward_kl_kernel(student_logp: torch.Tensor, teacher_logp: torch.Tensor, with_grad: bool):
    teacher_p = teacher_logp.exp()
    # b − a: in place when the kernel owns its inputs, one (N, V) temporary less on the commonest path
    log_ratio = teacher_logp.sub_(student_logp) if with_grad else teacher_logp - student_logp
    per_token = _rowwise_dot(teacher_p, log_ratio)
    return per_token, (student_logp.exp_().sub_(teacher_p) if with_grad else None)


def reverse_kl_kernel(student_logp: torch.Tensor, teacher_logp: torch.Tensor, with_grad: bool):
    student_p = student_logp.exp()
    log_ratio = student_logp - teacher_logp
    per_token = _rowwise_dot(student_p, log_ratio)
    return per_token, (log_ratio.sub_(per_token[:, None]).mul_(student_p) if with_grad else None)


def skew_forward_kl_kernel(student_logp, teacher_logp, with_grad: bool, *, skew_lambda: float):
    if skew_lambda == 0.0:
        return forward_kl_kernel(student_logp, teacher_logp, with_grad)
    # The mixture depends on the student: the gradient flows through its (1 − λ)·q part. Detaching that
    # part (a common slip) leaves a loss whose gradient with respect to the student is zero.
    teacher_p, student_p = teacher_logp.exp(), student_logp.exp()
    mixture = _mixture(teacher_p, student_p, skew_lambda)
    per_token = _rowwise_dot(teacher_p, teacher_logp - mixture.log())
    if not with_grad:
        return per_token, None
    grad_logp = mixture.reciprocal_().mul_(teacher_p).mul_(student_p).mul_(skew_lambda - 1)
    return per_token, _through_log_softmax(grad_logp, student_p)


def skew_reverse_kl_kernel(student_logp, teacher_logp, with_grad: bool, *, skew_lambda: float):
    if skew_lambda == 0.0:
        return reverse_kl_kernel(student_logp, teacher_logp, with_grad)
    teacher_p, student_p = teacher_logp.exp(), student_logp.exp()
    mixture = _mixture(student_p, teacher_p, skew_lambda)
    log_ratio = student_logp - mixture.log()
    per_token = _rowwise_dot(student_p, log_ratio)
    if not with_grad:
        return per_token, None
    grad_logp = mixture.reciprocal_().mul_(student_p).mul_(-skew_lambda).add_(log_ratio).add_(1).mul_(student_p)
    return per_token, _through_log_softmax(grad_logp, student_p)


def generalized_jsd_kernel(student_logp, teacher_logp, with_grad: bool, *, beta: float):
    # At β = 0 and β = 1 the mixture formula is identically 0; like TRL's GKD loss, the endpoints
    # are the KL divergences that JSD(β)/β and JSD(β)/(1 − β) tend to.
    if beta == 0.0:
        return forward_kl_kernel(student_logp, teacher_logp, with_grad)
    if beta == 1.0:
        return reverse_kl_kernel(student_logp, teacher_logp, with_grad)
    teacher_p, student_p = teacher_logp.exp(), student_logp.exp()
    log_mixture = _mixture(teacher_p, student_p, beta).log()
    student_log_ratio = student_logp - log_mixture
    teacher_term = _rowwise_dot(teacher_p, teacher_logp - log_mixture)
    per_token = beta * teacher_term + (1 - beta) * _rowwise_dot(student_p, student_log_ratio)
    if not with_grad:
        return per_token, None
    return per_token, _through_log_softmax(student_log_ratio.mul_(student_p).mul_(1 - beta), student_p)


def total_variation_kernel(student_logp: torch.Tensor, teacher_logp: torch.Tensor, with_grad: bool):
    student_p = student_logp.exp()
    difference = student_p - teacher_logp.exp()
    per_token = 0.5 * difference.abs().sum(-1)
    if not with_grad:
        return per_token, None
    return per_token, _through_log_softmax(difference.sign_().mul_(student_p).mul_(0.5), student_p)


def cross_entropy_chunk(logits: torch.Tensor, targets: torch.Tensor, with_grad: bool):
    """`(n, V)` float logits and `(n,)` targets -> `(n,)` cross-entropies and, when `with_grad`, their gradient
    with respect to the logits, `softmax − one_hot`. Rows of ignored targets hold garbage: callers mask them."""
    targets = targets.clamp(0, logits.size(-1) - 1)[:, None]
    log_normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
    per_token = (log_normaliser - logits.gather(1, targets)).squeeze(1)
    if not with_grad:
        return per_token, None
    softmax = torch.sub(logits, log_normaliser).exp_()
    return per_token, softmax.scatter_add_(1, targets, torch.full_like(log_normaliser, -1))


def clipped_kernel(kernel: Kernel, ceiling: float) -> Kernel:
    """`kernel` with each token's divergence clipped at `ceiling`: a token above it counts `ceiling` and gives no
    gradient (the gradient of `min(d, ceiling)`). On-policy distillation clips the per-token divergence so that the
    few tokens of a weak student's own answer that the teacher finds absurd do not dominate the update."""

    def clipped(student_logp: torch.Tensor, teacher_logp: torch.Tensor, with_grad: bool):
        per_token, grad = kernel(student_logp, teacher_logp, with_grad)
        over = per_token > ceiling
        if grad is not None:
            grad[over] = 0
        return per_token.clamp(max=ceiling), grad

    return clipped
