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

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from numbers import Real
from typing import NamedTuple

import torch

from ..constants import IGNORE_INDEX
from .chunking import (
    CPU_CHUNK_ELEMENTS,
    DEFAULT_CHUNK_ELEMENTS,
    LossSpec,
    StudentHead,
    StudentLogits,
    TeacherHead,
    TeacherLogits,
    TeacherTopK,
    chunked_loss,
    compute_dtype,
    default_block_size,
    default_chunk_size,
)
from .kernels import (
    Kernel,
    forward_kl_kernel,
    generalized_jsd_kernel,
    reverse_kl_kernel,
    skew_forward_kl_kernel,
    skew_reverse_kl_kernel,
    total_variation_kernel,
)
from .reduction import check_num_items, next_token_targets, token_normaliser
from .topk import TopKTeacher, check_top_k_teacher, teacher_top_k

__all__ = [
    "CPU_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_ELEMENTS",
    "DIVERGENCES",
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

MAX_PADDING_ROWS = 256
"""Vocabulary padding rule: a teacher vocabulary larger than the student's is accepted as padding
when it has at most `max(MAX_PADDING_ROWS, 1% of the student's vocabulary)` extra rows. Models pad
their embedding matrix to a multiple of 64, 128 or 256 (Qwen2.5: 151936 tokenizer rows vs 152064
in the 7B checkpoints), which adds fewer than 256 rows; different tokenizers differ by far more
(32000 vs 128256), and a loss between them would be silently wrong."""


# -- validation ----------------------------------------------------------------------------------------------------


def _check_unit_interval(name: str, value: float) -> None:
    if not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")


def _check_run_args(temperature: float, chunk_size: int | None, num_items_in_batch) -> None:
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


# -- running a divergence ------------------------------------------------------------------------------------------


def _kernel_for(divergence: str, params: dict) -> Kernel:
    """The kernel of `divergence` with its own parameters (function keywords) bound, validated."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {divergence!r}; choose one of {sorted(DIVERGENCES)}.")
    entry = DIVERGENCES[divergence]
    defaults = {param.argument: param.default for param in entry.params}
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(
            f"{divergence} takes no parameter {sorted(unknown)}; its own parameters are {sorted(defaults) or 'none'}."
        )
    values = {**defaults, **params}
    for name, value in values.items():
        _check_unit_interval(name, value)  # skew_lambda and beta both live in [0, 1]
    return partial(entry.kernel, **{name: float(value) for name, value in values.items()}) if values else entry.kernel


def _run(
    kernel: Kernel,
    student: StudentLogits | StudentHead,
    teacher: TeacherLogits | TeacherHead,
    labels: torch.Tensor,
    temperature: float,
    num_items_in_batch: int | torch.Tensor | None,
    chunk_size: int | None,
    weights: tuple[float, float | None] = (1.0, None),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the run arguments, then run the chunk engine over the valid positions: (loss, divergence, CE)."""
    _check_run_args(temperature, chunk_size, num_items_in_batch)
    targets = next_token_targets(labels.to(student.device))
    if weights[1] is not None:
        _check_targets(targets, student.vocab)
    num_valid = targets.ne(IGNORE_INDEX).sum()
    scale = token_normaliser(num_valid, num_items_in_batch, student.device, compute_dtype(student.dtype))
    chunk = chunk_size or default_chunk_size(student.vocab, student.device)
    block = None if chunk_size else default_block_size(chunk, student, teacher)  # a given size bounds all
    spec = LossSpec(kernel, float(temperature), chunk, kd_weight=weights[0], ce_weight=weights[1], block_size=block)
    return chunked_loss(spec, student, teacher, targets, scale)


def _divergence(kernel: Kernel, student_logits, teacher_logits, labels, temperature, *args) -> torch.Tensor:
    student, teacher = _sides(student_logits, teacher_logits, labels, temperature)
    return _run(kernel, student, teacher, labels, temperature, *args)[0]


# -- public logit divergences --------------------------------------------------------------------------------------

_COMMON_ARGS = """
    Args:
        student_logits: `(batch, seq_len, vocab)` logits of the student, unshifted.
        teacher_logits: `(batch, seq_len, vocab_t)` logits of the teacher; `vocab_t` may exceed the student's
            vocabulary by padding rows only (they are sliced off, see `MAX_PADDING_ROWS`). Or a `TopKTeacher`
            (a cached teacher): the divergence is then taken on its top-k tokens plus one tail bucket, a lower
            bound of the full one, equal when `k` is the whole vocabulary (see `hf_recover.losses.topk`).
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
        forward_kl_kernel, student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size
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
        reverse_kl_kernel, student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size
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
        total_variation_kernel, student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size
    )


forward_kl.__doc__ = "Forward KL `KL(p ‖ q)` (Hinton et al. 2015), mean over valid tokens.\n" + _COMMON_ARGS
reverse_kl.__doc__ = "Reverse KL `KL(q ‖ p)` (MiniLLM, Gu et al. 2024), mean over valid tokens.\n" + _COMMON_ARGS
skew_forward_kl.__doc__ = (
    "Skew forward KL `KL(p ‖ λp + (1 − λ)q)` (DistiLLM, Ko et al. 2024), mean over valid tokens.\n\n"
    "    `skew_lambda` is DistiLLM's λ, the weight of the *teacher* in the mixture (a skew weight on the student\n"
    "    would be `1 − λ`). `skew_lambda=0` is plain forward KL; `skew_lambda=1` gives 0.\n" + _COMMON_ARGS
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


# -- the one table of divergences ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DivergenceParam:
    """A divergence's own parameter."""

    field: str
    """The `DistillationConfig` field that sets it, e.g. `"jsd_beta"`."""
    argument: str
    """The keyword of the divergence's function, e.g. `"beta"`."""
    default: float
    symbol: str
    """How formulas name it, e.g. `"β"`."""
    one_is_degenerate: bool = False
    """Whether the value 1 makes the divergence identically 0 (the skew mixtures)."""


@dataclass(frozen=True)
class Divergence:
    """One logit divergence: call it like its function, `DIVERGENCES[name](student_logits, teacher_logits,
    labels, *, temperature=, num_items_in_batch=, chunk_size=, **params)`."""

    name: str
    function: Callable[..., torch.Tensor]
    kernel: Kernel
    formula: str
    source: str
    params: tuple[DivergenceParam, ...] = ()

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.function(*args, **kwargs)


_SKEW_LAMBDA = DivergenceParam("skew_lambda", "skew_lambda", 0.1, "λ", one_is_degenerate=True)
_DISTILLM = 'DistiLLM, Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models"'

DIVERGENCES: dict[str, Divergence] = {
    entry.name: entry
    for entry in (
        Divergence(
            name="forward_kl",
            function=forward_kl,
            kernel=forward_kl_kernel,
            formula="KL(p ‖ q)",
            source='Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"',
        ),
        Divergence(
            name="reverse_kl",
            function=reverse_kl,
            kernel=reverse_kl_kernel,
            formula="KL(q ‖ p)",
            source='MiniLLM, Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models"',
        ),
        Divergence(
            name="skew_forward_kl",
            function=skew_forward_kl,
            kernel=skew_forward_kl_kernel,
            formula="KL(p ‖ λp + (1−λ)q)",
            source=_DISTILLM,
            params=(_SKEW_LAMBDA,),
        ),
        Divergence(
            name="skew_reverse_kl",
            function=skew_reverse_kl,
            kernel=skew_reverse_kl_kernel,
            formula="KL(q ‖ λq + (1−λ)p)",
            source=_DISTILLM,
            params=(_SKEW_LAMBDA,),
        ),
        Divergence(
            name="generalized_jsd",
            function=generalized_jsd,
            kernel=generalized_jsd_kernel,
            formula="β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = βp + (1−β)q",
            source='GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from '
            'Self-Generated Mistakes"',
            params=(DivergenceParam("jsd_beta", "beta", 0.5, "β"),),
        ),
        Divergence(
            name="total_variation",
            function=total_variation,
            kernel=total_variation_kernel,
            formula="½ Σ |p − q|",
            source="total variation distance",
        ),
    )
}
"""The logit divergences, by name. `p` is the teacher's tempered distribution, `q` the student's."""


# -- CE and KD in one pass ---------------------------------------------------------------------------------------


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
        **divergence_params: `skew_lambda=` for the skew divergences, `beta=` for `generalized_jsd`.
    """
    kernel = _kernel_for(divergence, divergence_params)
    for name, weight in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"`{name}` must be a finite number >= 0, got {weight!r}.")
    student, teacher = _sides(student_logits, teacher_logits, labels, temperature)
    loss, kd, ce = _run(
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


class LMHeadInputs(NamedTuple):
    """A model's logits given by what makes them: `logits = softcap(hidden_states @ weight.T + bias)`."""

    hidden_states: torch.Tensor
    """`(batch, seq_len, hidden)`: the final hidden states (after the final norm), what the lm_head receives."""
    weight: torch.Tensor
    """`(vocab, hidden)`: the lm_head weight (tied embeddings work as they are)."""
    bias: torch.Tensor | None = None
    softcap: float | None = None
    """Gemma's `final_logit_softcapping`: logits become `softcap · tanh(logits / softcap)`."""


def _check_head(head: LMHeadInputs, name: str) -> torch.Tensor:
    """Validate an lm_head side; return a zero-stride stand-in for its logits (validated like logits, never
    allocated)."""
    hidden, weight, bias, softcap = head
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(
            f"`{name}` hidden states must be a floating-point tensor of shape (batch, seq_len, hidden), got "
            f"{hidden.dtype} of shape {tuple(hidden.shape)}."
        )
    if weight.dim() != 2 or weight.size(1) != hidden.size(-1):
        raise ValueError(
            f"`{name}` lm_head weight must be (vocab, hidden) with hidden = {hidden.size(-1)} (the hidden states' "
            f"width), got shape {tuple(weight.shape)}."
        )
    if bias is not None and tuple(bias.shape) != (weight.size(0),):
        raise ValueError(f"`{name}` lm_head bias must be ({weight.size(0)},), got {tuple(bias.shape)}.")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, Real) or not softcap > 0):
        raise ValueError(f"`{name}` softcap must be a number > 0 or None, got {softcap!r}.")
    return hidden.new_empty(()).expand(*hidden.shape[:2], weight.size(0))


def _sides(
    student, teacher, labels, temperature: float
) -> tuple[StudentLogits | StudentHead, TeacherLogits | TeacherHead | TeacherTopK]:
    """Validate both sides (logits, `LMHeadInputs`, a `TopKTeacher`) against the labels; wrap them as sources."""
    student_logits = _check_head(student, "student") if isinstance(student, LMHeadInputs) else student
    if isinstance(teacher, TopKTeacher):
        vocab = _check_logits(student_logits, student_logits, labels)  # the student's side against the labels
        check_top_k_teacher(teacher, tuple(labels.shape), vocab)
        student_side = StudentHead(*student) if isinstance(student, LMHeadInputs) else StudentLogits(student)
        return student_side, TeacherTopK(*teacher, temperature=float(temperature))
    teacher_logits = _check_head(teacher, "teacher") if isinstance(teacher, LMHeadInputs) else teacher
    _check_logits(student_logits, teacher_logits, labels)
    if (
        isinstance(teacher, LMHeadInputs)
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in teacher[:3])
    ):
        raise ValueError(
            "The teacher's hidden states or lm_head require a gradient, which a teacher given as LMHeadInputs does "
            "not receive: pass them detached (the trainer runs its teacher without gradients), or pass its logits."
        )
    student_side = StudentHead(*student) if isinstance(student, LMHeadInputs) else StudentLogits(student)
    teacher_side = TeacherHead(*teacher) if isinstance(teacher, LMHeadInputs) else TeacherLogits(teacher)
    return student_side, teacher_side


# --------------------------------------------------------------------------------------------
# Fused variant: from the student's last hidden states and lm_head, never storing its full logits.
# --------------------------------------------------------------------------------------------


# -- from the student's final hidden states and lm_head -------------------------------------------------------------


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
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "`teacher_logits` requires a gradient, which the fused loss does not propagate: pass "
            "`teacher_logits.detach()`, or use the unfused functions of `DIVERGENCES`."
        )
    head = LMHeadInputs(student_hidden_states, lm_head_weight, lm_head_bias)
    student, teacher = _sides(head, teacher_logits, labels, temperature)
    return _run(kernel, student, teacher, labels, temperature, num_items_in_batch, chunk_size)[0]
