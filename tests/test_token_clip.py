"""Per-token divergence clipping (the on-policy guard): values and gradients against a naive autograd reference."""

import pytest
import torch

from hf_recover.base.losses import distillation_loss


def naive_clipped_reverse_kl(student_logits, teacher_logits, labels, ceiling, temperature=1.0):
    """Mean over valid tokens of `min(KL(q‖p), ceiling)`, written plainly with autograd."""
    valid = labels[:, 1:] != -100
    q = torch.log_softmax(student_logits[:, :-1][valid].float() / temperature, -1)  # (N, V)
    p = torch.log_softmax(teacher_logits[:, :-1][valid].float() / temperature, -1)
    per_token = (q.exp() * (q - p)).sum(-1)
    return per_token.clamp(max=ceiling).mean(), per_token


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_clipped_divergence_equals_a_naive_reference(chunk_size):
    torch.manual_seed(0)
    student = torch.randn(2, 7, 11, requires_grad=True)
    teacher = 3 * torch.randn(2, 7, 11)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, 4:] = -100
    _, per_token = naive_clipped_reverse_kl(student.detach(), teacher, labels, ceiling=1e9)
    ceiling = per_token.median().item()  # about half the tokens are clipped
    assert (per_token > ceiling).any() and (per_token < ceiling).any()

    expected, _ = naive_clipped_reverse_kl(student, teacher, labels, ceiling)
    (expected_grad,) = torch.autograd.grad(expected, student)
    result = distillation_loss(
        student, teacher, labels, divergence="reverse_kl", ce_weight=0.0, kd_weight=1.0, chunk_size=chunk_size,
        max_token_divergence=ceiling,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(result.loss, student)
    assert result.kd.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_a_ceiling_above_every_token_changes_nothing_and_one_below_stops_every_gradient():
    torch.manual_seed(1)
    student = torch.randn(1, 6, 9, requires_grad=True)
    teacher, labels = torch.randn(1, 6, 9), torch.randint(0, 9, (1, 6))
    kwargs = dict(divergence="reverse_kl", ce_weight=0.0, kd_weight=1.0)
    plain = distillation_loss(student, teacher, labels, **kwargs)
    high = distillation_loss(student, teacher, labels, max_token_divergence=1e6, **kwargs)
    assert high.kd.item() == pytest.approx(plain.kd.item())
    torch.testing.assert_close(torch.autograd.grad(high.loss, student)[0], torch.autograd.grad(plain.loss, student)[0])
    tiny = distillation_loss(student, teacher, labels, max_token_divergence=1e-9, **kwargs)
    assert tiny.kd.item() == pytest.approx(1e-9)
    assert torch.autograd.grad(tiny.loss, student)[0].abs().max() == 0
    with pytest.raises(ValueError, match="max_token_divergence must be > 0"):
        distillation_loss(student, teacher, labels, max_token_divergence=0.0, **kwargs)
