"""The logit divergences: six public functions and `DIVERGENCES`, the one table of them (name, function, per-token
kernel, formula, source, and the `DistillationConfig` field that sets each parameter). The configuration, the
trainer, the model card and the README read the table.

`p` is the teacher's tempered distribution, `q` the student's. Each function returns the mean over valid tokens at
temperature `T`, *not* multiplied by `T²`: the trainer applies Hinton's `T²` scaling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .inputs import loss_sources, run_chunked
from .kernels import (
    Kernel,
    forward_kl_kernel,
    generalized_jsd_kernel,
    reverse_kl_kernel,
    skew_forward_kl_kernel,
    skew_reverse_kl_kernel,
    total_variation_kernel,
)
from .validation import check_unit_interval


def kernel_for(divergence: str, params: dict) -> Kernel:
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
        check_unit_interval(name, value)  # skew_lambda and beta both live in [0, 1]
    return partial(entry.kernel, **{name: float(value) for name, value in values.items()}) if values else entry.kernel


def _divergence(kernel: Kernel, student_logits, teacher_logits, labels, temperature, *args) -> torch.Tensor:
    student, teacher = loss_sources(student_logits, teacher_logits, labels, temperature)
    return run_chunked(kernel, student, teacher, labels, temperature, *args)[0]


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Forward KL `KL(p ‖ q)` (Hinton et al. 2015), mean over valid tokens.

    Args:
        student_logits: `(batch, seq_len, vocab)` logits of the student, unshifted.
        teacher_logits: `(batch, seq_len, vocab_t)` logits of the teacher; `vocab_t` may exceed the student's
            vocabulary by padding rows only (they are sliced off, see `MAX_PADDING_ROWS`). Or a `TopKTeacher`
            (a cached teacher): the divergence is then taken on its top-k tokens plus one tail bucket, a lower
            bound of the full one, equal when `k` is the whole vocabulary (see `hf_recover.base.losses.topk`).
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
    """Reverse KL `KL(q ‖ p)` (MiniLLM, Gu et al. 2024), mean over valid tokens.

    Arguments and result as `forward_kl`'s."""
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
    """Skew forward KL `KL(p ‖ λp + (1 − λ)q)` (DistiLLM, Ko et al. 2024), mean over valid tokens.

    `skew_lambda` is DistiLLM's λ, the weight of the *teacher* in the mixture (a skew weight on the student
    would be `1 − λ`). `skew_lambda=0` is plain forward KL; `skew_lambda=1` gives 0. Every other argument and the
    result as `forward_kl`'s."""
    kernel = kernel_for("skew_forward_kl", {"skew_lambda": skew_lambda})
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
    """Skew reverse KL `KL(q ‖ λq + (1 − λ)p)` (DistiLLM, Ko et al. 2024), mean over valid tokens.

    `skew_lambda` is DistiLLM's λ, the weight of the distribution on the left of the KL (here the student)
    in the mixture, so `skew_lambda=0` is plain reverse KL and `skew_lambda=1` gives 0. Every other argument and
    the result as `forward_kl`'s."""
    kernel = kernel_for("skew_reverse_kl", {"skew_lambda": skew_lambda})
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
    """Generalized JSD `β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)`, `m = βp + (1 − β)q` (GKD, Agarwal et al. 2024).

    As in TRL, `beta=0` is forward KL `KL(p ‖ q)` and `beta=1` is reverse KL `KL(q ‖ p)` (the mixture
    formula itself vanishes at both ends). `beta=0.5` is the symmetric Jensen-Shannon divergence. Every other
    argument and the result as `forward_kl`'s."""
    kernel = kernel_for("generalized_jsd", {"beta": beta})
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
    """Total variation distance `½ Σ |p − q|`, mean over valid tokens.

    Arguments and result as `forward_kl`'s."""
    return _divergence(
        total_variation_kernel, student_logits, teacher_logits, labels, temperature, num_items_in_batch, chunk_size
    )


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
