"""Distillation in a TRL `SFTTrainer` script: `DistillationSFTConfig` and `DistillationSFTTrainer`.

An SFT script becomes a recovery script by three changes: import these two names, use them in place of `SFTConfig`
and `SFTTrainer`, and pass `teacher_model=`. Everything SFT does stays SFT's: dataset preparation (chat templates,
`completion_only_loss`, `assistant_only_loss`, packing, padding-free), its loss (`loss_type="nll"` or `"dft"`, label
smoothing, `compute_loss_func`) and its metrics (`mean_token_accuracy`, `entropy`, `num_tokens`). The teacher terms
of `DistillationTrainer` are added to SFT's loss on the tokens SFT trains on (prompt tokens masked by SFT are
masked for the teacher terms too):

    loss = alpha·SFT_loss + beta·T²·KD(teacher ‖ student) + gamma·align + delta·FDD

and logged as `ce` (SFT's loss, unweighted), `kd`, `align`, `fdd` next to SFT's metrics. Needs `trl>=1.16`
(`pip install "hf-recover[trl]"`).

TRL's own `DistillationTrainer`/`DistillationConfig` are a different method (on-policy generalized-KD on generated
completions); their `beta` chooses the divergence (generalized JSD interpolation) and their `temperature` also
samples. Here `beta` weighs the KD term, `temperature` softens both distributions (the term is scaled by T²),
`divergence` chooses the divergence and `jsd_beta` is the generalized JSD's interpolation.

Example::

    from trl import SFTTrainer, SFTConfig                                         # before
    from hf_recover.integrations.trl import DistillationSFTConfig, DistillationSFTTrainer

    args = DistillationSFTConfig(output_dir="out", assistant_only_loss=True, alpha=0.5, beta=0.5, temperature=2.0)
    trainer = DistillationSFTTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=chats, processing_class=tokenizer
    )
    trainer.train()
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers.modeling_outputs import CausalLMOutputWithPast

from ..distill.config import DistillationConfig
from ..distill.lm_head import base_model, first_output, head_logits
from ..distill.trainer import DistillationTrainer

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # an optional extra
    raise ImportError(
        "hf_recover.integrations.trl needs TRL: pip install 'hf-recover[trl]' (or pip install 'trl>=1.16')."
    ) from err


def _sft_default(name: str):
    """SFTConfig's own default (and help) for a `TrainingArguments` field it overrides."""
    sft_field = SFTConfig.__dataclass_fields__[name]
    return field(default=sft_field.default, metadata=sft_field.metadata)


@dataclass
class DistillationSFTConfig(DistillationConfig, SFTConfig):
    r"""`SFTConfig` with the fields of `DistillationConfig` (`alpha`, `beta`, `temperature`, `divergence`, `gamma`,
    `delta`, `layer_map`, ...). Both sets of fields keep their meaning and defaults; each class checks its own."""

    # DistillationConfig carries TrainingArguments' defaults for these, which would hide SFTConfig's.
    learning_rate: float = _sft_default("learning_rate")
    logging_steps: float = _sft_default("logging_steps")
    gradient_checkpointing: bool = _sft_default("gradient_checkpointing")
    bf16: bool | None = _sft_default("bf16")


class _SFTLossWithStudentOutputs(SFTTrainer):
    """SFT's `compute_loss`, which also hands back the student's logits and hidden states when asked.

    SFT's forward never builds the logits (its fused LM head computes the per-token log-probabilities in tiles).
    `DistillationTrainer` needs them, with their gradient, for the teacher terms: they are computed from the
    backbone's output of that same forward, so the student runs once and SFT's loss and metrics are SFT's own.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not return_outputs:
            return super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        causal_lm = base_model(self.accelerator.unwrap_model(model))  # PEFT's model inside
        with first_output(causal_lm.base_model) as backbone:
            loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if not backbone:
            raise RuntimeError(
                f"{type(causal_lm).__name__}'s backbone (`{causal_lm.base_model_prefix}`) did not run in SFT's "
                "forward: its logits cannot be recovered for the teacher terms."
            )
        hidden = backbone[0].last_hidden_state
        logits = head_logits(causal_lm, hidden)  # (B, T, H) -> (B, T, V), with its gradient
        return loss, CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=backbone[0].hidden_states)


class DistillationSFTTrainer(DistillationTrainer, _SFTLossWithStudentOutputs):
    """`SFTTrainer` with the teacher terms of `DistillationTrainer`.

    Args:
        model, teacher_model, pruned_config, teacher_tokenizer: as for `DistillationTrainer`.
        args: a `DistillationSFTConfig` (an `SFTConfig`, `DistillationConfig` or `TrainingArguments` is upgraded,
            keeping its values).
        **kwargs: every other `SFTTrainer` argument (`train_dataset`, `processing_class`, `peft_config`,
            `formatting_func`, ...).

    SFT's loss is the CE term (`alpha` weighs it): the combined CE+KD pass of `DistillationTrainer` is not used,
    whatever `fused_cross_entropy` says, so that `loss_type`, label smoothing and `compute_loss_func` keep working.
    SFT's metrics stay in `SFTTrainer._metrics`, the teacher terms in `loss_terms`: both are logged.
    """

    pads_labels_by_default = False  # SFT collates its own batches (packing, padding-free, completion masks)

    def __init__(self, model=None, teacher_model=None, args=None, **kwargs):
        super().__init__(model=model, teacher_model=teacher_model, args=DistillationSFTConfig.upgrade(args), **kwargs)

    def _can_fuse_cross_entropy(self) -> bool:
        return False  # the CE term is SFT's loss
