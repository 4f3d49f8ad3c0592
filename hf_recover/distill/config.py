"""`DistillationConfig`: `TrainingArguments` plus the fields of the recovery loss.

The trainer minimises `alpha·CE + beta·T²·KD + gamma·align + delta·FDD`: the student's cross-entropy, a logit
divergence scaled by `T²` (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"), hidden-state
alignment through a layer map, and feature dynamics distillation (Gong et al. 2025, "Beyond Logits: Aligning
Feature Dynamics for Effective Knowledge Distillation"). The divergences and their parameters come from
`hf_recover.base.losses.DIVERGENCES`. The defaults are the 0.5·CE + 0.5·T²·forward KL recipe at T = 2; switch on
`gamma`/`delta` for hidden-state alignment and feature dynamics.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..base.losses import DIVERGENCES
from .alignment import LAYER_MAP_KINDS

DIVERGENCE_NAMES = tuple(DIVERGENCES)  # the logit divergences hf_recover.base.losses implements
_DIVERGENCE_PARAMS = {param.field: param for entry in DIVERGENCES.values() for param in entry.params}
ALIGNMENT_KINDS = ("cosine", "mse")
PROJECTOR_KINDS = ("auto", "none", "linear")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
LOSS_COMPONENTS = ("ce", "kd", "align", "fdd")
"""The loss terms the trainer logs (`ce`, `eval_ce`, ...): unweighted, `kd` without `T²`. Lower is better."""
OBJECTIVE_NAME = "distillation_loss"
"""Evaluation reports the optimised objective as `eval_distillation_loss` (`test_...` in predict)."""


def parse_layer_map(value) -> str | list[int]:
    """`"kept"|"uniform"|"last"` stay strings; `"0,2,4"`, `"[0, 2, 4]"` or a sequence of ints become a list."""
    given = value
    if isinstance(value, str):
        if value.strip() in LAYER_MAP_KINDS:
            return value.strip()
        value = [item.strip() for item in value.strip().strip("[]").split(",")]
        if all(re.fullmatch(r"\d+", item) for item in value):
            value = [int(item) for item in value]
    if isinstance(value, (list, tuple)) and value and all(type(i) is int and i >= 0 for i in value):
        return list(value)
    raise ValueError(
        f"layer_map must be one of {LAYER_MAP_KINDS} or a comma-separated list of teacher block indices, one per "
        f"student block (e.g. '0,2,4'), got {given!r}."
    )


@dataclass
class DistillationConfig(TrainingArguments):
    r"""`TrainingArguments` for [`DistillationTrainer`]; only the distillation fields are new.

    The training loss is `alpha·CE + beta·temperature²·KD + gamma·align + delta·FDD`, each token term averaged
    over valid tokens (normalised by `num_items_in_batch` under gradient accumulation, as `Trainer` does).
    With `beta = gamma = delta = 0` the teacher is never run and, with `alpha = 1`, training is plain `Trainer`'s.
    """

    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the student's cross-entropy on the labels. Default 0.5 (0.5/0.5 CE/KD recipe)."},
    )
    beta: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the logit divergence KD(teacher ‖ student), which is also multiplied by "
            "temperature² (Hinton et al. 2015). Default 0.5."
        },
    )
    gamma: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the hidden-state alignment loss between mapped student and teacher blocks (as in "
            "DistillKit). Default 0 (off); hidden states are only requested when gamma or delta > 0."
        },
    )
    delta: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the feature-dynamics loss (FDD, Gong et al., ACL 2025): cosine between the changes of "
            "consecutive student blocks and of their mapped teacher blocks. Default 0 (off)."
        },
    )
    temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T of the logit divergence; must be > 0. Default 2.0 (Hinton et al.)."},
    )
    divergence: str = field(
        default="forward_kl",
        metadata={
            "help": "Logit divergence: "
            + ", ".join(
                f"{name} {entry.formula} ({entry.source.split(',')[0]})" for name, entry in DIVERGENCES.items()
            )
            + ". Default forward_kl."
        },
    )
    skew_lambda: float = field(
        default=0.1,
        metadata={
            "help": "Skew mixture weight λ in [0, 1), DistiLLM's convention: skew_forward_kl is KL(p ‖ λp + (1−λ)q), "
            "λ weighting the *teacher* p (a skew weight on the student would be 1 − λ); skew_reverse_kl is "
            "KL(q ‖ λq + (1−λ)p), λ weighting the student q. 0 gives plain KL. Default 0.1 (DistiLLM, Ko et al. 2024)."
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={
            "help": "β in [0, 1] of the generalized JSD. Default 0.5 (GKD, Agarwal et al. 2024; TRL's default)."
        },
    )
    alignment: str = field(
        default="cosine",
        metadata={"help": "Hidden-state alignment distance: cosine (1 − cos) or mse. Default cosine."},
    )
    layer_map: str = field(
        default="kept",
        metadata={
            "help": "Student block → teacher block map for alignment and FDD: kept (the teacher blocks depth pruning "
            "kept, read from pruned_config.json; exact), uniform (⌊i·n_t/n_s⌋), last (i + n_t − n_s), or an explicit "
            "comma-separated list with one teacher block per student block, e.g. '0,2,4' (a list in YAML). "
            "Default kept."
        },
    )
    projector: str = field(
        default="auto",
        metadata={
            "help": "Learnable linear projectors from student to teacher hidden states: auto (only when the hidden "
            "sizes differ), linear (always; identity-initialised when sizes match) or none. Default auto."
        },
    )
    save_projectors: bool = field(
        default=False,
        metadata={
            "help": "Also write the projectors (projectors.safetensors) into the exported model folder. They are "
            "always written into checkpoints, so that resuming restores them. Default False."
        },
    )
    fdd_magnitude_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the optional magnitude term of FDD (relative delta-norm difference). Default 0."},
    )
    kd_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per chunk of the logit divergence, which bounds its float32 (tokens, vocab) "
            "intermediates (with the fused lm_head, also the positions each lm_head multiplies at once). Default "
            "None: automatic chunks of about 2M logits on CPU, 8M on accelerators, and lm_head blocks of at least "
            "128 positions (hf_recover.base.losses' defaults)."
        },
    )
    fused_cross_entropy: bool = field(
        default=True,
        metadata={
            "help": "Compute the student's cross-entropy together with the logit divergence, in one pass over the "
            "logits (hf_recover.distillation_loss), instead of by the model. Same loss, faster. It is used only where "
            "the model's own loss is transformers' plain causal-LM cross-entropy: label smoothing, compute_loss_func, "
            "router auxiliary losses, z-loss, shift_labels (context parallelism), model subclasses and models whose "
            "forward computes a cross-entropy of its own (BART-style decoders) keep the model's loss. "
            "Set False for a model whose own loss adds other terms. Default True."
        },
    )
    fused_lm_head: bool = field(
        default=True,
        metadata={
            "help": "In training, run both models to their final hidden states and apply their lm_heads inside the "
            "loss, block by block of positions, so that neither model's (tokens × vocab) logits nor their gradient "
            "ever exist whole: the memory of a plain fine-tuning step at long contexts and large vocabularies. Used "
            "with the fused cross-entropy, for the tested model types whose logits are norm → linear lm_head (→ "
            "Gemma's soft-capping); others keep their logits. It saves the most at long contexts and large "
            "vocabularies (see benchmarks/step_memory.py). Set False to keep the logits path (e.g. for a "
            "compute_loss override that reads the training outputs' logits). Default True."
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype used when the teacher is given as a path or Hub id: auto (as saved), float32, bfloat16 or "
            "float16. Default auto."
        },
    )
    eval_objective_as_loss: bool = field(
        default=False,
        metadata={
            "help": "Report the distillation objective as eval_loss / test_loss. Default False: eval_loss is the "
            "student's own language-modelling loss, as plain Trainer reports it (exp(eval_loss) is its perplexity), "
            "and the objective is eval_distillation_loss."
        },
    )
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy distillation (GKD's λ): the share of training batches in which the student answers the "
            "chat rows' prompts itself and the teacher scores its answers; the loss of those batches is the "
            "distillation term alone (no cross-entropy on the student's own samples). Needs chat rows (a "
            "`prompt_length` column, as hf_recover's chat datasets have) and a teacher model, not a cache. Default 0 "
            "(off)."
        },
    )
    on_policy_max_new_tokens: int = field(
        default=128, metadata={"help": "Longest answer the student writes on an on-policy batch. Default 128."}
    )
    on_policy_temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature of the student's on-policy answers (> 0). Default 1.0 (GKD's)."},
    )
    on_policy_kl_clip: float | None = field(
        default=None,
        metadata={
            "help": "Clip each token's divergence on on-policy batches at this value (a token above it gives no "
            "gradient), the guard that keeps a weak student's own answers from dominating the update. Default None "
            "(no clipping); 1.0 is the value used for on-policy phases."
        },
    )
    merge_adapters: bool = field(
        default=False,
        metadata={
            "help": "For a PEFT (LoRA) student: merge the adapters into the base weights when training ends, so "
            "save_model writes a plain model. Default False (the adapter is saved)."
        },
    )

    def __post_init__(self):
        # Checked before TrainingArguments sets up devices: a bad recipe fails before any work is spent.
        for name in ("alpha", "beta", "gamma", "delta", "fdd_magnitude_weight", "temperature"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}.")
        for name in ("alpha", "beta", "gamma", "delta", "fdd_magnitude_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (it weights a loss term), got {getattr(self, name)}.")
        if self.alpha == self.beta == self.gamma == self.delta == 0:
            raise ValueError("alpha, beta, gamma and delta are all 0: nothing to train on. Set at least one > 0.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.divergence not in DIVERGENCE_NAMES:
            raise ValueError(f"divergence must be one of {DIVERGENCE_NAMES}, got {self.divergence!r}.")
        for name in _DIVERGENCE_PARAMS:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}.")
        for param in DIVERGENCES[self.divergence].params:
            if param.one_is_degenerate and self.beta > 0 and getattr(self, param.field) == 1:
                raise ValueError(
                    f"{param.field} = 1 makes {self.divergence} identically 0 (the mixture is the distribution "
                    f"itself); use a value in [0, 1), e.g. {param.default}."
                )
        if self.alignment not in ALIGNMENT_KINDS:
            raise ValueError(f"alignment must be one of {ALIGNMENT_KINDS}, got {self.alignment!r}.")
        if self.projector not in PROJECTOR_KINDS:
            raise ValueError(f"projector must be one of {PROJECTOR_KINDS}, got {self.projector!r}.")
        if self.kd_chunk_size is not None and self.kd_chunk_size < 1:
            raise ValueError(f"kd_chunk_size must be >= 1 or None (automatic chunks), got {self.kd_chunk_size}.")
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"lmbda is the share of on-policy batches and must lie in [0, 1], got {self.lmbda}.")
        if self.lmbda > 0 and self.beta == 0:
            raise ValueError("lmbda > 0 trains on the teacher's scores of the student's answers: set beta > 0 too.")
        if self.on_policy_max_new_tokens < 1 or not self.on_policy_temperature > 0:
            raise ValueError("on_policy_max_new_tokens must be >= 1 and on_policy_temperature > 0.")
        if self.on_policy_kl_clip is not None and not self.on_policy_kl_clip > 0:
            raise ValueError(f"on_policy_kl_clip must be > 0 or None (no clipping), got {self.on_policy_kl_clip!r}.")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}.")
        self.layer_map = parse_layer_map(self.layer_map)
        # TrainingArguments takes every metric name not ending in "loss" as higher-is-better; all of ours are losses.
        metric = self.metric_for_best_model
        if (
            self.greater_is_better is None
            and metric
            and metric.removeprefix("eval_") in (*LOSS_COMPONENTS, OBJECTIVE_NAME)
        ):
            self.greater_is_better = False
        if (self.bf16 or self.bf16_full_eval) and not self.use_cpu and not _has_accelerator():
            # Trainer runs on the CPU anyway, but refuses bf16 there unless told use_cpu: a CPU-only machine needs no
            # such flag to train in bfloat16 (base/precision.py says where that is fast)
            self.use_cpu = True
        super().__post_init__()

    @classmethod
    def upgrade(cls, args: TrainingArguments | None):
        """`args` as this config class: None gives the defaults, an instance is returned as it is, any other
        `TrainingArguments` (an `SFTConfig`, ...) keeps its values and gains the distillation defaults, as TRL does
        for its configs."""
        if args is None:
            return cls(output_dir="tmp_trainer")
        if isinstance(args, cls):
            return args
        if not isinstance(args, TrainingArguments):
            raise ValueError(f"args must be a {cls.__name__} (or TrainingArguments), got {type(args).__name__}.")
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})

    # -- what the recipe implies: derived here once, read by the trainer, the workflow and the model card --------

    @property
    def uses_teacher(self) -> bool:
        """Whether any term needs the teacher (beta, gamma or delta > 0)."""
        return self.beta > 0 or self.gamma > 0 or self.delta > 0

    @property
    def wants_hidden_states(self) -> bool:
        """Whether hidden states are compared (gamma or delta > 0)."""
        return self.gamma > 0 or self.delta > 0

    @property
    def rows_per_step(self) -> int:
        """Training rows one optimizer step consumes: batch per device x accumulation steps x processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def divergence_kwargs(self) -> dict[str, float]:
        """The chosen divergence's own keyword arguments, from their config fields (e.g. `{"beta": jsd_beta}`)."""
        return {param.argument: getattr(self, param.field) for param in DIVERGENCES[self.divergence].params}

    DEPTH_RECOVERY_RECIPE = {
        "alpha": 0.5,
        "beta": 0.5,
        "gamma": 0.1,
        "delta": 0.0,
        "temperature": 2.0,
        "divergence": "forward_kl",
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "per_device_train_batch_size": 2,
    }

    ON_POLICY_PHASE_RECIPE = {
        "alpha": 0.0,
        "beta": 1.0,
        "gamma": 0.0,
        "delta": 0.0,
        "temperature": 1.0,
        "divergence": "reverse_kl",
        "lmbda": 0.5,
        "on_policy_kl_clip": 1.0,
        "learning_rate": 5e-5,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "per_device_train_batch_size": 4,
    }

    @classmethod
    def for_on_policy_phase(cls, **overrides) -> DistillationConfig:
        """A second phase after an off-policy warm start (`for_depth_recovery` on the teacher's answers): on half
        the batches the student answers the chat rows' prompts itself and learns the teacher's view of its own
        tokens (reverse KL at T = 1, GKD's on-policy distillation), on the other half it reads the teacher's own
        answers (teacher rollouts mixed in); each token's divergence is clipped at 1, and there is no
        cross-entropy. On-policy distillation pays from a warm start, not a cold one (Agarwal et al. 2024; Qwen3
        distils off-policy first; weak students' rollouts loop without such guards). Train it on chat rows only.
        """
        return cls(**{**cls.ON_POLICY_PHASE_RECIPE, **overrides})

    @classmethod
    def for_depth_recovery(cls, **overrides) -> DistillationConfig:
        """The recipe for recovering a depth-pruned (and healed) student at small budgets.

        `0.5·CE + 0.5·T²·forward KL + 0.1·(1 − cos)` hidden alignment (`kept` layer map), T = 2, AdamW at lr 1e-4
        constant, in batches of 2 sequences: at a fixed token budget of tens of thousands of tokens, more optimizer
        steps pay more than larger batches, and a larger learning rate trades text outside the training domain for
        a little in-domain. The measurements behind it are in docs/recovery.md. Any field can be overridden:
        `DistillationConfig.for_depth_recovery(output_dir="out", max_steps=200)`.
        """
        return cls(**{**cls.DEPTH_RECOVERY_RECIPE, **overrides})


def _has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (torch.accelerator from torch 2.6; CUDA before)."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
