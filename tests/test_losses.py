"""Distillation losses against independent references: token loops in probability space, `F.kl_div`,
hand-computed values, properties, chunked == unchunked, and float64 gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs
from torch import nn

from hf_recover.base.constants import IGNORE_INDEX
from hf_recover.base.losses import (
    DIVERGENCES,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)

# Each divergence with a non-default value of its own parameter, so the parameter is exercised.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("skew_forward_kl", {"skew_lambda": 0.3}),
    ("skew_reverse_kl", {"skew_lambda": 0.3}),
    ("generalized_jsd", {"beta": 0.3}),
    ("total_variation", {}),
]
CASE_IDS = [name for name, _ in CASES]
DENSITIES = pytest.mark.parametrize("ignore", [0.3, 0.8], ids=["dense", "sparse"])


def token_divergence(name: str, p: torch.Tensor, q: torch.Tensor, params: dict) -> torch.Tensor:
    """Per-token divergence, from the probability-space formulas of the papers; `p`, `q` are (V,) or (N, V)."""

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "skew_forward_kl":
        lam = params.get("skew_lambda", 0.1)
        return kl(p, lam * p + (1 - lam) * q)
    if name == "skew_reverse_kl":
        lam = params.get("skew_lambda", 0.1)
        return kl(q, lam * q + (1 - lam) * p)
    if name == "generalized_jsd":
        beta = params.get("beta", 0.5)
        if beta == 0:
            return kl(p, q)
        if beta == 1:
            return kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "total_variation":
        return 0.5 * (p - q).abs().sum(-1)
    raise KeyError(name)


def naive_loss(name, student, teacher, labels, *, temperature=1.0, num_items_in_batch=None, **params):
    """Explicit loop over (sequence, position) in float64; differentiable, so it is a gradient reference too."""
    vocab = student.size(-1)
    total, count = student.new_zeros((), dtype=torch.float64), 0
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):
            if labels[b, t + 1] == IGNORE_INDEX:
                continue
            p = torch.softmax(teacher[b, t, :vocab].double() / temperature, -1)
            q = torch.softmax(student[b, t].double() / temperature, -1)
            total = total + token_divergence(name, p, q, params)
            count += 1
    return total / max(num_items_in_batch if num_items_in_batch is not None else count, 1)


def reference_loss(name, student, teacher, labels, *, temperature=1.0, num_items_in_batch=None, **params):
    """The loop above, vectorised over tokens with a boolean mask (fast enough for the larger shapes)."""
    vocab = student.size(-1)
    valid = labels[:, 1:] != IGNORE_INDEX
    p = torch.softmax(teacher[:, :-1, :vocab][valid].double() / temperature, -1)  # (N, V)
    q = torch.softmax(student[:, :-1][valid].double() / temperature, -1)
    return token_divergence(name, p, q, params).sum() / max(
        num_items_in_batch if num_items_in_batch is not None else len(p), 1
    )


# ---------------------------------------------------------------------------------------------
# Values against independent references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_naive_loop(name, params, temperature):
    student, teacher, labels = make_inputs(batch=2, seq=13, vocab=37)
    got = DIVERGENCES[name](student, teacher, labels, temperature=temperature, chunk_size=5, **params)
    want = naive_loss(name, student, teacher, labels, temperature=temperature, **params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_kl_matches_f_kl_div():
    student, teacher, labels = make_inputs(batch=2, seq=9, vocab=17, ignore=False)
    temperature = 2.0
    # Shift as a causal LM does: every position but the last is scored (no label is ignored).
    log_q = F.log_softmax(student[:, :-1].reshape(-1, 17) / temperature, -1)
    log_p = F.log_softmax(teacher[:, :-1].reshape(-1, 17) / temperature, -1)
    want_forward = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    want_reverse = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    torch.testing.assert_close(forward_kl(student, teacher, labels, temperature=temperature), want_forward)
    torch.testing.assert_close(reverse_kl(student, teacher, labels, temperature=temperature), want_reverse)


def hand_case(temperature=1.0):
    """One scored token: q = (1/2, 1/2), p = (1/4, 3/4); the second position is never scored."""
    student = torch.tensor([[[0.0, 0.0], [50.0, -50.0]]])
    teacher = torch.tensor([[[0.0, temperature * math.log(3.0)], [-50.0, 50.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1]])
    return student, teacher, labels


L = math.log
HAND_VALUES = {
    ("forward_kl", ()): 0.25 * L(0.25 / 0.5) + 0.75 * L(0.75 / 0.5),
    ("reverse_kl", ()): 0.5 * L(0.5 / 0.25) + 0.5 * L(0.5 / 0.75),
    # λ = 0.5: m = (0.375, 0.625) for both skews.
    ("skew_forward_kl", (("skew_lambda", 0.5),)): 0.25 * L(0.25 / 0.375) + 0.75 * L(0.75 / 0.625),
    ("skew_reverse_kl", (("skew_lambda", 0.5),)): 0.5 * L(0.5 / 0.375) + 0.5 * L(0.5 / 0.625),
    ("generalized_jsd", (("beta", 0.5),)): 0.5 * (0.25 * L(0.25 / 0.375) + 0.75 * L(0.75 / 0.625))
    + 0.5 * (0.5 * L(0.5 / 0.375) + 0.5 * L(0.5 / 0.625)),
    ("total_variation", ()): 0.5 * (0.25 + 0.25),
}


@pytest.mark.parametrize(("key", "value"), list(HAND_VALUES.items()), ids=[k[0] for k in HAND_VALUES])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hand_computed(key, value, temperature):
    name, params = key
    student, teacher, labels = hand_case(temperature)
    got = DIVERGENCES[name](student, teacher, labels, temperature=temperature, **dict(params))
    assert got.item() == pytest.approx(value, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_zero_for_identical_and_nonnegative(name, params):
    student, teacher, labels = make_inputs()
    fn = DIVERGENCES[name]
    assert fn(student, student.clone(), labels, **params).abs().item() < 1e-6
    assert fn(student, teacher, labels, **params).item() > 1e-3  # different inputs: clearly positive


def test_skew_lambda_endpoints():
    student, teacher, labels = make_inputs()
    torch.testing.assert_close(
        skew_forward_kl(student, teacher, labels, skew_lambda=0.0), forward_kl(student, teacher, labels)
    )
    torch.testing.assert_close(
        skew_reverse_kl(student, teacher, labels, skew_lambda=0.0), reverse_kl(student, teacher, labels)
    )
    assert skew_forward_kl(student, teacher, labels, skew_lambda=1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert skew_reverse_kl(student, teacher, labels, skew_lambda=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # Skewing shrinks the divergence monotonically (the mixture moves towards the left distribution).
    values = [skew_forward_kl(student, teacher, labels, skew_lambda=lam).item() for lam in (0.0, 0.1, 0.5, 0.9)]
    assert values == sorted(values, reverse=True)


def test_jsd_endpoints_and_symmetry():
    student, teacher, labels = make_inputs()
    torch.testing.assert_close(
        generalized_jsd(student, teacher, labels, beta=0.0), forward_kl(student, teacher, labels)
    )
    torch.testing.assert_close(
        generalized_jsd(student, teacher, labels, beta=1.0), reverse_kl(student, teacher, labels)
    )
    # JSD_β(p, q) = JSD_{1-β}(q, p): swapping the models mirrors β; β = 0.5 is symmetric.
    torch.testing.assert_close(
        generalized_jsd(student, teacher, labels, beta=0.2), generalized_jsd(teacher, student, labels, beta=0.8)
    )
    torch.testing.assert_close(
        generalized_jsd(student, teacher, labels, beta=0.5), generalized_jsd(teacher, student, labels, beta=0.5)
    )
    assert generalized_jsd(student, teacher, labels).item() <= math.log(2)  # JS divergence is bounded by ln 2


def test_total_variation_symmetric_and_bounded():
    student, teacher, labels = make_inputs()
    value = total_variation(student, teacher, labels)
    torch.testing.assert_close(value, total_variation(teacher, student, labels))
    assert 0.0 < value.item() <= 1.0
    # Pinsker: TV <= sqrt(KL / 2) token by token, hence for the means via Jensen.
    assert value.item() <= math.sqrt(forward_kl(student, teacher, labels).item() / 2)


# ---------------------------------------------------------------------------------------------
# Chunking: chunked == unchunked, values and gradients
# ---------------------------------------------------------------------------------------------

TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3}}


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student_grad", "both_grads"])
@DENSITIES
def test_chunked_equals_unchunked(name, params, dtype, teacher_grad, ignore):
    """Student-only gradients take the hand-derived path, a teacher gradient the autograd one: both checked."""
    student, teacher, labels = make_inputs(3, 47, 123, teacher_vocab=125, dtype=dtype, ignore=ignore)
    fn = DIVERGENCES[name]
    results = []
    for chunk_size in (10**6, None, 1, 7, 64):
        s = student.clone().requires_grad_()
        t = teacher.clone().requires_grad_(teacher_grad)
        loss = fn(s, t, labels, temperature=1.7, chunk_size=chunk_size, **params)
        loss.backward()
        results.append((loss, s.grad, t.grad))
    reference = results[0]
    for loss, student_grad, teacher_grad_ in results[1:]:
        torch.testing.assert_close(loss, reference[0], **TOLERANCES[torch.float32])  # float32 compute in both
        torch.testing.assert_close(student_grad, reference[1], **TOLERANCES[dtype])
        if teacher_grad:
            torch.testing.assert_close(teacher_grad_, reference[2], **TOLERANCES[dtype])
    # And the unchunked path is right: against the float64 reference, per-dtype tolerance on gradients.
    s = student.double().requires_grad_()
    t = teacher.double().requires_grad_()
    reference_loss(name, s, t, labels, temperature=1.7, **params).backward()
    assert reference[0].dtype == torch.float32 and reference[1].dtype == dtype
    torch.testing.assert_close(
        reference[0].double(),
        reference_loss(name, student, teacher, labels, temperature=1.7, **params),
        rtol=1e-4,
        atol=1e-6,
    )
    torch.testing.assert_close(reference[1].double(), s.grad, **TOLERANCES[dtype])
    if teacher_grad:
        torch.testing.assert_close(reference[2].double(), t.grad, **TOLERANCES[dtype])


# ---------------------------------------------------------------------------------------------
# Gradients: float64 gradcheck catches a wrongly detached term
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@DENSITIES
def test_gradcheck(name, params, ignore):
    """Both gradient paths: the hand-derived student gradient, and autograd when the teacher needs one."""
    torch.manual_seed(1)
    student, teacher, labels = make_inputs(2, 6, 5, teacher_vocab=6, dtype=torch.float64, scale=1.0, ignore=ignore)
    student.requires_grad_()
    fn = DIVERGENCES[name]

    def loss(s, t):
        return fn(s, t, labels, temperature=1.3, chunk_size=3, **params)

    assert torch.autograd.gradcheck(loss, (student, teacher))
    assert torch.autograd.gradcheck(loss, (student, teacher.requires_grad_()))


def test_skew_gradient_flows_through_the_mixture():
    """A student term detached inside the mixture leaves only KL(p‖λp + const): gradient zero. Ours is not,
    and equals the analytic one: d/dz_s SKL = (1−λ)·(q ⊙ (1 − r) − q·Σ q(1 − r))/T... checked via the loop."""
    student, teacher, labels = make_inputs(1, 4, 5, dtype=torch.float64, ignore=False, scale=1.0)
    student.requires_grad_()
    skew_forward_kl(student, teacher, labels, skew_lambda=0.5).backward()
    assert student.grad[:, :-1].abs().max() > 1e-3
    s = student.detach().clone().requires_grad_()
    naive_loss("skew_forward_kl", s, teacher, labels, skew_lambda=0.5).backward()
    torch.testing.assert_close(student.grad, s.grad)


def test_scaled_backward_and_repeated_backward():
    """`(w·loss).backward()` scales the gradient; retain_graph lets backward run twice without corruption."""
    student, teacher, labels = make_inputs()
    s = student.clone().requires_grad_()
    loss = forward_kl(s, teacher, labels, chunk_size=16)
    (grad_one,) = torch.autograd.grad(loss, s, retain_graph=True)
    (grad_three,) = torch.autograd.grad(3.0 * loss, s, retain_graph=True)
    (grad_one_again,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(grad_three, 3.0 * grad_one)
    torch.testing.assert_close(grad_one_again, grad_one)


def test_no_grad_mode_builds_no_graph():
    student, teacher, labels = make_inputs()
    student.requires_grad_()
    with torch.no_grad():
        value = forward_kl(student, teacher, labels)
    assert not value.requires_grad
    torch.testing.assert_close(value, forward_kl(student, teacher, labels).detach())


# ---------------------------------------------------------------------------------------------
# Masking, normalisation, vocabulary padding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_ignored_positions_have_no_effect(name, params):
    student, teacher, labels = make_inputs(2, 11, 13)
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:] == IGNORE_INDEX
    ignored[:, -1] = True  # the last position predicts nothing
    s = student.clone().requires_grad_()
    loss = DIVERGENCES[name](s, teacher, labels, **params)
    loss.backward()
    assert s.grad[ignored].abs().max() == 0
    assert s.grad[~ignored].abs().max() > 0
    # Garbage at ignored positions changes nothing.
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[ignored] = 100 * torch.randn_like(noisy_student[ignored])
    noisy_teacher[ignored] = 100 * torch.randn_like(noisy_teacher[ignored])
    torch.testing.assert_close(DIVERGENCES[name](noisy_student, noisy_teacher, labels, **params), loss.detach())


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("num_items_in_batch", [None, 0, 7])
def test_empty_batch_is_zero_with_gradient(name, params, num_items_in_batch):
    student, teacher, labels = make_inputs(2, 6, 9)
    labels[:, 1:] = IGNORE_INDEX  # label 0 is never a target: no valid token at all
    s = student.clone().requires_grad_()
    loss = DIVERGENCES[name](s, teacher, labels, num_items_in_batch=num_items_in_batch, chunk_size=4, **params)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_num_items_in_batch_matches_gradient_accumulation(name, params):
    student, teacher, labels = make_inputs(4, 10, 11)
    fn = DIVERGENCES[name]
    whole = fn(student, teacher, labels, **params)
    num_valid = int((labels[:, 1:] != IGNORE_INDEX).sum())
    # Two micro-batches, each divided by the token count of the whole batch, sum to the whole-batch mean.
    for num_items in (num_valid, torch.tensor(num_valid)):
        parts = [
            fn(student[i : i + 2], teacher[i : i + 2], labels[i : i + 2], num_items_in_batch=num_items, **params)
            for i in (0, 2)
        ]
        torch.testing.assert_close(sum(parts), whole)
    torch.testing.assert_close(fn(student, teacher, labels, num_items_in_batch=2 * num_valid, **params), whole / 2)
    want = reference_loss(name, student, teacher, labels, num_items_in_batch=50, **params)
    torch.testing.assert_close(
        fn(student, teacher, labels, num_items_in_batch=50, **params).double(), want, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_teacher_padding_rows_are_sliced(name, params):
    student, teacher, labels = make_inputs(2, 7, 100, teacher_vocab=105)
    fn = DIVERGENCES[name]
    torch.testing.assert_close(
        fn(student, teacher, labels, **params), fn(student, teacher[..., :100], labels, **params)
    )


def test_qwen_sized_padding_is_accepted():
    student, teacher, labels = make_inputs(1, 3, 151936, teacher_vocab=152064, scale=1.0, ignore=False)
    torch.testing.assert_close(
        forward_kl(student, teacher, labels), forward_kl(student, teacher[..., :151936], labels)
    )


@pytest.mark.parametrize(("student_vocab", "teacher_vocab"), [(100, 400), (100, 99), (32000, 128256)])
def test_vocabulary_mismatch_is_an_error(student_vocab, teacher_vocab):
    student = torch.randn(1, 3, student_vocab)
    teacher = torch.randn(1, 3, teacher_vocab)
    labels = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"{student_vocab}.*{teacher_vocab}"):
        forward_kl(student, teacher, labels)


# ---------------------------------------------------------------------------------------------
# Bad input and the registry
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error():
    student, teacher, labels = make_inputs(2, 5, 7)
    with pytest.raises(ValueError, match="batch, seq_len"):
        forward_kl(student, teacher, labels[:, :4])
    with pytest.raises(ValueError, match="student_logits"):
        forward_kl(student[0], teacher, labels)
    with pytest.raises(ValueError, match="teacher_logits"):
        forward_kl(student, teacher[:1], labels)
    with pytest.raises(ValueError, match="labels"):
        forward_kl(student, teacher, labels.float())
    for temperature in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            forward_kl(student, teacher, labels, temperature=temperature)
    for value in (-0.1, 1.5):
        with pytest.raises(ValueError, match="skew_lambda"):
            skew_forward_kl(student, teacher, labels, skew_lambda=value)
        with pytest.raises(ValueError, match="skew_lambda"):
            skew_reverse_kl(student, teacher, labels, skew_lambda=value)
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd(student, teacher, labels, beta=value)
    with pytest.raises(ValueError, match="chunk_size"):
        forward_kl(student, teacher, labels, chunk_size=0)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        forward_kl(student, teacher, labels, num_items_in_batch=-1)


def test_registry_calls_like_the_trainer():
    assert set(DIVERGENCES) == {
        "forward_kl",
        "reverse_kl",
        "skew_forward_kl",
        "skew_reverse_kl",
        "generalized_jsd",
        "total_variation",
    }
    student, teacher, labels = make_inputs()
    for name, params in CASES:
        value = DIVERGENCES[name](
            student, teacher, labels, temperature=2.0, num_items_in_batch=40, chunk_size=8, **params
        )
        want = reference_loss(name, student, teacher, labels, temperature=2.0, num_items_in_batch=40, **params)
        torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-7)


def test_public_api_exports_losses():
    import hf_recover
    from hf_recover.distill.alignment import feature_dynamics_loss

    assert hf_recover.forward_kl is forward_kl
    assert hf_recover.feature_dynamics_loss is feature_dynamics_loss


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@DENSITIES
def test_no_full_batch_float32_intermediates(name, params, ignore):
    """Forward + backward allocate nothing larger than one chunk, except the logits' gradient itself."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class RecordOutputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.tensors = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.tensors += [(tuple(t.shape), t.untyped_storage().data_ptr()) for t in outputs]
            return out

    student, teacher, labels = make_inputs(2, 64, 50, ignore=ignore)
    student.requires_grad_()
    chunk_size = 8
    with RecordOutputs() as recorder:
        DIVERGENCES[name](student, teacher, labels, chunk_size=chunk_size, **params).backward()
    assert student.grad is not None
    large = {storage for shape, storage in recorder.tensors if math.prod(shape) > chunk_size * 50}
    # Only the gradient buffer (and views of it, in-place ops on it) and views of the inputs.
    assert student.grad.untyped_storage().data_ptr() in large
    assert large <= {
        student.grad.untyped_storage().data_ptr(),
        student.untyped_storage().data_ptr(),
        teacher.untyped_storage().data_ptr(),
    }


# ---------------------------------------------------------------------------------------------
# Fused variant: hidden states + lm_head in, never the student's full logits
# ---------------------------------------------------------------------------------------------


def make_fused_inputs(batch=3, seq=29, hidden=16, vocab=61, *, teacher_vocab=None, dtype=torch.float32, bias=False):
    _, teacher, labels = make_inputs(batch, seq, vocab, teacher_vocab=teacher_vocab)
    states = torch.randn(batch, seq, hidden, dtype=dtype)
    weight = (torch.randn(vocab, hidden) / hidden**0.5 * 3).to(dtype)
    lm_bias = torch.randn(vocab, dtype=dtype) if bias else None
    return states, weight, lm_bias, teacher.to(dtype), labels


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@DENSITIES
def test_fused_equals_unfused(name, params, dtype, ignore):
    from hf_recover.base.losses import fused_linear_divergence

    states, weight, lm_bias, teacher, labels = make_fused_inputs(teacher_vocab=63, dtype=dtype, bias=True)
    labels = make_inputs(*labels.shape, 61, ignore=ignore)[2]  # dense (sliced) and sparse (gathered) walks
    leaves = [tensor.clone().requires_grad_() for tensor in (states, weight, lm_bias)]
    unfused = DIVERGENCES[name](F.linear(*leaves), teacher, labels, temperature=1.5, chunk_size=7, **params)
    unfused.backward()
    fused_leaves = [tensor.clone().requires_grad_() for tensor in (states, weight, lm_bias)]
    fused = fused_linear_divergence(
        fused_leaves[0],
        fused_leaves[1],
        teacher,
        labels,
        divergence=name,
        lm_head_bias=fused_leaves[2],
        temperature=1.5,
        chunk_size=7,
        **params,
    )
    fused.backward()
    torch.testing.assert_close(fused, unfused, **TOLERANCES[torch.float32])
    for got, want in zip(fused_leaves, leaves):
        torch.testing.assert_close(got.grad, want.grad, **TOLERANCES[dtype])


def test_fused_gradcheck_and_scaled_backward():
    from hf_recover.base.losses import fused_linear_divergence

    states, weight, lm_bias, teacher, labels = make_fused_inputs(2, 4, 3, 5, dtype=torch.float64, bias=True)

    def loss(s, w, b):
        return fused_linear_divergence(
            s, w, teacher, labels, divergence="skew_forward_kl", lm_head_bias=b, chunk_size=3
        )

    inputs = tuple(tensor.requires_grad_() for tensor in (states, weight, lm_bias))
    assert torch.autograd.gradcheck(loss, inputs)
    (grad_one,) = torch.autograd.grad(loss(*inputs), states)
    (grad_two,) = torch.autograd.grad(2 * loss(*inputs), states)
    torch.testing.assert_close(grad_two, 2 * grad_one)


def test_fused_never_builds_student_logits():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from hf_recover.base.losses import fused_linear_divergence

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __init__(self, inputs):
            super().__init__()
            self.input_storages = {t.untyped_storage().data_ptr() for t in inputs}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                # Storage bytes of what is allocated: views of the inputs and expanded stand-ins cost nothing.
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.input_storages:
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
            return out

    states, weight, _, teacher, labels = make_fused_inputs(2, 64, 8, 50)
    states.requires_grad_()
    weight.requires_grad_()
    with LargestOutput((states, weight, teacher, labels)) as recorder:
        fused_linear_divergence(states, weight, teacher, labels, chunk_size=8).backward()
    # Nothing larger than one float32 chunk of logits or the hidden states' gradient; the logits would be 16x that.
    assert recorder.largest == max(8 * 50, states.numel()) * 4
    assert states.grad.abs().max() > 0 and weight.grad.abs().max() > 0


def test_fused_bad_inputs():
    from hf_recover.base.losses import fused_linear_divergence

    states, weight, _, teacher, labels = make_fused_inputs()
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_divergence(states, weight[:, :5], teacher, labels)
    with pytest.raises(ValueError, match="Unknown divergence"):
        fused_linear_divergence(states, weight, teacher, labels, divergence="kl")
    with pytest.raises(ValueError, match="beta"):
        fused_linear_divergence(states, weight, teacher, labels, divergence="forward_kl", beta=0.5)
    with pytest.raises(ValueError, match="skew_lambda"):
        fused_linear_divergence(states, weight, teacher, labels, divergence="skew_forward_kl", skew_lambda=2.0)
    with pytest.raises(ValueError, match="detach"):
        fused_linear_divergence(states, weight, teacher.clone().requires_grad_(), labels)
    with pytest.raises(ValueError, match="61.*400"):
        fused_linear_divergence(states, weight, torch.randn(3, 29, 400), labels)
    with pytest.raises(ValueError, match="batch, seq_len"):
        fused_linear_divergence(states, weight, teacher, labels[:, :5])


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_autocast_does_not_lower_precision(name, params):
    """Under bf16 autocast (as in mixed-precision training) the kernels still compute in float32."""
    student, teacher, labels = make_inputs(2, 9, 300)
    s = student.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = DIVERGENCES[name](s, teacher, labels, **params)
    value.backward()
    t = student.clone().requires_grad_()
    want = DIVERGENCES[name](t, teacher, labels, **params)
    want.backward()
    torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s.grad, t.grad, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# distillation_loss: CE and a divergence in one pass
# ---------------------------------------------------------------------------------------------


def test_dense_and_sparse_walks():
    """Mostly valid batches are walked in contiguous slices, mostly ignored ones by gathering (`DENSITIES`
    runs every equality test through both)."""
    from hf_recover.base.losses.chunking import token_chunks as _token_chunks
    from hf_recover.base.losses.reduction import next_token_mask as _valid_mask

    for ignore, walk in ((0.3, slice), (0.8, torch.Tensor)):
        _, _, labels = make_inputs(3, 47, 11, ignore=ignore)
        valid = _valid_mask(labels)
        chunks = _token_chunks(valid, 7)
        assert chunks and all(isinstance(index, walk) for index, _ in chunks)
        covered = torch.zeros(valid.numel(), dtype=torch.bool)
        for index, mask in chunks:
            covered[index] = True if mask is None else mask
        assert torch.equal(covered, valid.reshape(-1))  # exactly the valid positions count


def hf_cross_entropy(student, labels, num_items_in_batch=None):
    """Hugging Face's own causal-LM loss, the reference for the cross-entropy term."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(student, labels, student.size(-1), num_items_in_batch=num_items_in_batch)


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student_grad", "both_grads"])
@DENSITIES
def test_distillation_loss_is_ce_plus_divergence(name, params, teacher_grad, ignore):
    student, teacher, labels = make_inputs(3, 47, 123, teacher_vocab=125, ignore=ignore)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_(teacher_grad)
    result = distillation_loss(
        s, t, labels, divergence=name, ce_weight=0.7, kd_weight=1.9, temperature=1.6, chunk_size=7, **params
    )
    result.loss.backward()

    s64, t64 = student.double().requires_grad_(), teacher.double().requires_grad_()
    ce = hf_cross_entropy(s64, labels)
    kd = reference_loss(name, s64, t64, labels, temperature=1.6, **params)
    (0.7 * ce + 1.9 * kd).backward()
    torch.testing.assert_close(result.loss.double(), 0.7 * ce + 1.9 * kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.ce.double(), ce.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.kd.double(), kd, rtol=1e-5, atol=1e-6)
    assert not result.ce.requires_grad and not result.kd.requires_grad
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)
    if teacher_grad:
        torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-6)


@DENSITIES
def test_distillation_loss_bf16_num_items_and_no_grad(ignore):
    student, teacher, labels = make_inputs(2, 29, 64, dtype=torch.bfloat16, ignore=ignore)
    s = student.clone().requires_grad_()
    result = distillation_loss(
        s, teacher, labels, ce_weight=0.5, kd_weight=2.0, temperature=2.0, num_items_in_batch=40
    )
    result.loss.backward()
    assert result.loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16

    s32 = student.float().requires_grad_()
    ce = hf_cross_entropy(s32, labels, num_items_in_batch=40)
    kd = forward_kl(s32, teacher.float(), labels, temperature=2.0, num_items_in_batch=40)
    (0.5 * ce + 2.0 * kd).backward()
    torch.testing.assert_close(result.loss, 0.5 * ce + 2.0 * kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s32.grad.bfloat16(), **TOLERANCES[torch.bfloat16])
    with torch.no_grad():
        evaluated = distillation_loss(s, teacher, labels, ce_weight=0.5, kd_weight=2.0, temperature=2.0)
    torch.testing.assert_close(evaluated.ce, hf_cross_entropy(student.float(), labels), rtol=1e-5, atol=1e-6)
    assert not evaluated.loss.requires_grad


def test_distillation_loss_without_ce_gradient_still_reports_ce():
    student, teacher, labels = make_inputs(2, 17, 31)
    s, s_kd = student.clone().requires_grad_(), student.clone().requires_grad_()
    result = distillation_loss(s, teacher, labels, ce_weight=0.0, kd_weight=1.5, temperature=1.3, chunk_size=4)
    result.loss.backward()
    (1.5 * forward_kl(s_kd, teacher, labels, temperature=1.3)).backward()
    torch.testing.assert_close(s.grad, s_kd.grad)
    torch.testing.assert_close(result.ce, hf_cross_entropy(student, labels))
    torch.testing.assert_close(result.loss, 1.5 * result.kd)


def test_distillation_loss_bad_input():
    student, teacher, labels = make_inputs(1, 5, 7)
    for name, weight in (("ce_weight", -1.0), ("kd_weight", float("nan")), ("ce_weight", True)):
        with pytest.raises(ValueError, match=name):
            distillation_loss(student, teacher, labels, **{name: weight})
    with pytest.raises(ValueError, match="Unknown divergence"):
        distillation_loss(student, teacher, labels, divergence="kl")
    with pytest.raises(ValueError, match="skew_lambda"):
        distillation_loss(student, teacher, labels, divergence="skew_forward_kl", skew_lambda=1.5)


@DENSITIES
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_leaves_its_inputs_alone(ignore, temperature):
    """Dense chunks are views of the caller's logits: nothing may be written into them, at T = 1 least of all."""
    student, teacher, labels = make_inputs(2, 23, 19, teacher_vocab=21, ignore=ignore)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    distillation_loss(s, t, labels, temperature=temperature, chunk_size=5).loss.backward()
    assert torch.equal(s, student) and torch.equal(t, teacher)
    for name, params in CASES:
        DIVERGENCES[name](s, teacher, labels, temperature=temperature, chunk_size=5, **params).backward()
        assert torch.equal(s, student), name


def test_distillation_loss_with_every_label_ignored_and_at_the_dense_boundary():
    student, teacher, labels = make_inputs(2, 9, 13, ignore=0)
    s = student.clone().requires_grad_()
    result = distillation_loss(s, teacher, labels.fill_(IGNORE_INDEX))
    result.loss.backward()
    assert result.loss.item() == result.ce.item() == result.kd.item() == 0 and not s.grad.any()

    labels = torch.randint(0, 13, (2, 9))
    labels[:, 1:5] = IGNORE_INDEX  # 8 of the 16 scored positions: exactly half, the dense walk
    s = student.clone().requires_grad_()
    result = distillation_loss(s, teacher, labels, ce_weight=0.3, kd_weight=0.9, temperature=1.2, chunk_size=4)
    result.loss.backward()
    s64 = student.double().requires_grad_()
    reference = 0.3 * hf_cross_entropy(s64, labels).double() + 0.9 * reference_loss(
        "forward_kl", s64, teacher.double(), labels, temperature=1.2
    )
    reference.backward()
    torch.testing.assert_close(result.loss.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


def test_float16_gradients_survive_loss_scaling():
    """Under fp16 mixed precision backward starts from GradScaler's scale (2^16, inf in float16): the logits'
    gradient is kept in float32 until it is applied, so small softmax gradients neither underflow nor overflow."""
    torch.manual_seed(0)
    student, teacher, labels = make_inputs(1, 64, 32000, dtype=torch.float16, ignore=0)
    scale = 2.0**16
    s = student.clone().requires_grad_()
    result = distillation_loss(s, teacher, labels, ce_weight=1.0, kd_weight=1.0, num_items_in_batch=2048)
    (result.loss * scale).backward()
    assert s.grad.dtype == torch.float16 and torch.isfinite(s.grad).all()

    s64 = student.double().requires_grad_()
    reference = hf_cross_entropy(s64, labels, num_items_in_batch=2048).double() + reference_loss(
        "forward_kl", s64, teacher.double(), labels, num_items_in_batch=2048
    )
    (reference * scale).backward()
    want = s64.grad[:, :-1].half()
    assert (s.grad[:, :-1] != 0).float().mean() >= (want != 0).float().mean() - 0.01  # no underflow to zero
    torch.testing.assert_close(s.grad[:, :-1].double() / scale, want.double() / scale, rtol=2e-3, atol=1e-9)


def test_distillation_loss_rejects_labels_outside_the_vocabulary():
    student, teacher, labels = make_inputs(1, 6, 7, ignore=0)
    for bad in (-1, 7):
        labels[0, 3] = bad
        with pytest.raises(ValueError, match=r"token ids in \[0, 7\)"):
            distillation_loss(student, teacher, labels)


def test_the_divergence_table_matches_its_functions_and_the_config():
    """One table: each divergence's parameters are its function's keywords, with the same defaults, and the
    `DistillationConfig` fields that set them exist with those defaults."""
    import dataclasses
    import inspect

    from hf_recover import DistillationConfig

    config_defaults = {f.name: f.default for f in dataclasses.fields(DistillationConfig)}
    for name, entry in DIVERGENCES.items():
        assert entry.name == name
        keywords = inspect.signature(entry.function).parameters
        own = set(keywords) - {"student_logits", "teacher_logits", "labels", "temperature", "num_items_in_batch"}
        assert own - {"chunk_size"} == {param.argument for param in entry.params}, name
        for param in entry.params:
            assert keywords[param.argument].default == param.default == config_defaults[param.field], name
        assert entry.source and entry.formula
    student, teacher, labels = make_inputs()
    torch.testing.assert_close(
        DIVERGENCES["reverse_kl"](student, teacher, labels), reverse_kl(student, teacher, labels)
    )


# ---------------------------------------------------------------------------------------------
# distillation_loss with lm_head inputs on either side (the trainer's fused lm_head path)
# ---------------------------------------------------------------------------------------------


def capped(logits, softcap):
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def automatic_blocks_of_several_chunks(monkeypatch, vocab: int) -> None:
    """Automatic chunks of 5 positions and lm_head blocks of 17: blocks span several chunks, and rows."""
    from hf_recover.base.losses import chunking

    monkeypatch.setattr(chunking, "CPU_CHUNK_ELEMENTS", 5 * vocab)
    monkeypatch.setattr(chunking, "HEAD_BLOCK_TOKENS", 17)


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("softcap", [None, 2.5], ids=["plain", "softcap"])
@pytest.mark.parametrize("blocks", [False, True], ids=["chunk-per-block", "blocks-of-chunks"])
@DENSITIES
def test_distillation_loss_from_lm_heads_equals_the_logits_path(name, params, softcap, blocks, ignore, monkeypatch):
    from hf_recover.base.losses import LMHeadInputs

    if blocks:
        automatic_blocks_of_several_chunks(monkeypatch, 61)
    torch.manual_seed(0)
    states, weight, bias, _, _ = make_fused_inputs(3, 29, 16, 61, bias=True)
    labels = make_inputs(3, 29, 61, ignore=ignore)[2]
    teacher_states, teacher_weight = torch.randn(3, 29, 24), torch.randn(63, 24) / 24**0.5 * 3  # 2 padding rows
    leaves = [t.clone().requires_grad_() for t in (states, weight, bias)]
    student_logits = capped(F.linear(*leaves), softcap)
    teacher_logits = capped(F.linear(teacher_states, teacher_weight), softcap)
    kwargs = dict(divergence=name, ce_weight=0.7, kd_weight=1.3, temperature=1.5, chunk_size=7, **params)
    want = distillation_loss(student_logits, teacher_logits, labels, **kwargs)
    want.loss.backward()
    head_leaves = [t.clone().requires_grad_() for t in (states, weight, bias)]
    got = distillation_loss(
        LMHeadInputs(*head_leaves, softcap=softcap),
        LMHeadInputs(teacher_states, teacher_weight, softcap=softcap),
        labels,
        **{**kwargs, "chunk_size": None if blocks else 7},
    )
    got.loss.backward()
    for field in ("loss", "ce", "kd"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6)
    for head_leaf, leaf in zip(head_leaves, leaves):
        torch.testing.assert_close(head_leaf.grad, leaf.grad, rtol=1e-4, atol=1e-6)


def test_tied_lm_head_gets_both_gradients():
    """A tied lm_head is the embedding matrix: its gradient from the loss adds to the embedding's own."""
    from hf_recover.base.losses import LMHeadInputs

    embedding = nn.Embedding(61, 16)
    ids = torch.randint(0, 61, (2, 13))
    labels = ids.clone()
    teacher = torch.randn(2, 13, 61)
    results = []
    for fused in (False, True):
        embedding.zero_grad()
        states = embedding(ids) * 1.5  # (B, T, H), depends on the embedding too
        student = LMHeadInputs(states, embedding.weight) if fused else F.linear(states, embedding.weight)
        distillation_loss(student, teacher, labels, chunk_size=5).loss.backward()
        results.append(embedding.weight.grad.clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("blocks", [False, True], ids=["chunks-of-8", "blocks-of-17"])
def test_no_logits_sized_tensor_with_lm_heads_on_both_sides(blocks, monkeypatch):
    """Neither the student's nor the teacher's (tokens, vocab) logits, nor their gradient, ever exist whole: at most
    one chunk of them, or one lm_head block with automatic chunks."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from hf_recover.base.losses import LMHeadInputs

    states, weight, _, _, labels = make_fused_inputs(2, 64, 8, 50)
    teacher_states, teacher_weight = torch.randn(2, 64, 12), torch.randn(50, 12)
    states.requires_grad_()
    weight.requires_grad_()
    inputs = (states, weight, teacher_states, teacher_weight, labels)

    class LargestAllocation(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and all(
                    t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for x in inputs
                ):
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
            return out

    if blocks:
        automatic_blocks_of_several_chunks(monkeypatch, 50)
    rows = 17 if blocks else 8
    with LargestAllocation() as recorder:
        distillation_loss(
            LMHeadInputs(states, weight),
            LMHeadInputs(teacher_states, teacher_weight),
            labels,
            chunk_size=None if blocks else 8,
        ).loss.backward()
    # One float32 block of logits, or the hidden states' gradient; the logits would be 128 rows.
    assert recorder.largest <= max(rows * 50, states.numel()) * 4
    assert states.grad.abs().max() > 0 and weight.grad.abs().max() > 0


def test_a_teacher_head_that_requires_grad_is_refused():
    from hf_recover.base.losses import LMHeadInputs

    states, weight, _, _, labels = make_fused_inputs(2, 5, 8, 11)
    with pytest.raises(ValueError, match="detached"):
        distillation_loss(torch.randn(2, 5, 11), LMHeadInputs(states.requires_grad_(), weight), labels)
    with pytest.raises(ValueError, match="softcap"):
        distillation_loss(torch.randn(2, 5, 11), LMHeadInputs(states.detach(), weight, softcap=0.0), labels)


def test_the_readme_lists_every_divergence_of_the_table():
    """The README's divergence table is written from `DIVERGENCES`: a new entry without a README row fails here."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    for name, entry in DIVERGENCES.items():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, name
        assert f"`{entry.formula.replace('|', chr(92) + '|')}`" in row, name
        for param in entry.params:
            assert f"`{param.field}`" in row, name


def test_every_divergence_has_its_docstring_in_its_source():
    """Read where the function is written (IDEs, `help()` and source readers all see it), never attached later."""
    import ast
    import inspect

    from hf_recover.base.losses import divergences

    tree = ast.parse(inspect.getsource(divergences))
    written = {node.name: ast.get_docstring(node) for node in tree.body if isinstance(node, ast.FunctionDef)}
    attached = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "__doc__"]
    assert attached == []
    for name, entry in divergences.DIVERGENCES.items():
        assert entry.function.__name__ == name and written[name], name
        assert written[name].split("\n")[0] == entry.function.__doc__.split("\n")[0], name
        assert "forward_kl" in written[name] or name == "forward_kl", name  # the shared arguments are documented once
    assert "num_items_in_batch" in written["forward_kl"] and "Returns:" in written["forward_kl"]


def test_lm_heads_multiply_in_bfloat16_under_bf16_autocast():
    """Under bfloat16 autocast an lm_head source multiplies as the model's own `nn.Linear` would there: logits from
    bfloat16 products, upcast before any softmax; the weight's gradient summed in float32. The reference builds the
    logits with bfloat16 matmuls by hand; without autocast the same call matches float32 products instead."""
    from hf_recover.base.losses import LMHeadInputs
    from hf_recover.base.losses.chunking import head_matmul_dtype

    torch.manual_seed(0)
    states, weight, bias, _, _ = make_fused_inputs(3, 29, 16, 61, bias=True)
    labels = make_inputs(3, 29, 61, ignore=0.2)[2]
    teacher_states, teacher_weight = torch.randn(3, 29, 24), torch.randn(61, 24) / 24**0.5 * 3
    kwargs = dict(ce_weight=0.7, kd_weight=1.3, temperature=1.5, chunk_size=7)

    def reference(half: bool):
        leaves = [t.clone().requires_grad_() for t in (states, weight, bias)]
        cast = (lambda t: t.bfloat16()) if half else (lambda t: t)
        student = F.linear(*(cast(t) for t in leaves)).float()
        teacher = F.linear(cast(teacher_states), cast(teacher_weight)).float()
        result = distillation_loss(student, teacher, labels, **kwargs)
        result.loss.backward()
        return result.loss, [leaf.grad for leaf in leaves]

    def fused(autocast: bool):
        leaves = [t.clone().requires_grad_() for t in (states, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            heads = LMHeadInputs(*leaves), LMHeadInputs(teacher_states, teacher_weight)
            result = distillation_loss(*heads, labels, **kwargs)
        result.loss.backward()
        assert result.loss.dtype == torch.float32 and all(leaf.grad.dtype == torch.float32 for leaf in leaves)
        return result.loss, [leaf.grad for leaf in leaves]

    (half_loss, half_grads), (full_loss, full_grads) = reference(True), reference(False)
    got_loss, got_grads = fused(True)
    torch.testing.assert_close(got_loss, half_loss, rtol=1e-5, atol=1e-6)  # the same bfloat16 logits
    assert not torch.allclose(got_loss, full_loss, rtol=1e-5, atol=1e-6)  # which float32 products would not give
    for got, want in zip(got_grads, half_grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)  # backward's products in bfloat16 too
    got_loss, got_grads = fused(False)
    torch.testing.assert_close(got_loss, full_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(got_grads, full_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # float16 autocast keeps float32 products: a token's gradient would underflow in float16.
    with torch.autocast("cpu", dtype=torch.float16):
        assert head_matmul_dtype(weight) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head_matmul_dtype(weight) == torch.bfloat16
        assert head_matmul_dtype(weight.double()) == torch.float64  # only float32 weights are autocast's
    assert head_matmul_dtype(weight.bfloat16()) == torch.bfloat16
