"""`DistillationTrainer`: a drop-in `Trainer` that recovers a pruned student from its teacher.

Change `Trainer` to `DistillationTrainer`, `TrainingArguments` to `DistillationConfig` and pass the teacher;
the rest of an HF training script (datasets, collators, callbacks, evaluation, checkpoints, resuming,
gradient accumulation, mixed precision, PEFT) keeps working. The loss is

    alpha·CE + beta·T²·KD(teacher ‖ student) + gamma·align(layer map, projectors) + delta·FDD

with the terms of `hf_recover.base.losses`; see `DistillationConfig` for the fields and their defaults.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DataCollatorForSeq2Seq, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..base.anatomy import accepts
from ..base.constants import IGNORE_INDEX
from ..base.generation import Sampling
from ..base.losses import DIVERGENCES, distillation_loss
from ..base.precision import autocast_to
from ..base.pruned_config import PrunedConfig
from .alignment import (
    build_layer_map,
    build_projectors,
    feature_dynamics_loss,
    hidden_alignment_loss,
    last_block_output,
    layer_map_pairs,
    with_last_block,
)
from .cached_training import split_cached_teacher, training_cache_columns
from .config import OBJECTIVE_NAME, DistillationConfig
from .lm_head import (
    final_hidden_states,
    fused_head_problem,
    is_peft_model,
    loss_side,
    no_logits,
    plain_loss_problem,
    text_config,
)
from .loss_terms import LossTerms
from .on_policy import PROMPT_LENGTH_COLUMN, check_on_policy_inputs, on_policy_batch
from .saving import PROJECTORS_NAME, SavesRecoveredModels
from .teacher import (
    check_tokenizers,
    check_vocabularies,
    load_teacher,
    load_teacher_tokenizer,
    prepare_deepspeed_teacher,
)

logger = logging.getLogger(__name__)


class DistillationTrainer(SavesRecoveredModels, Trainer):
    """`Trainer` whose loss is `alpha·CE + beta·T²·KD + gamma·align + delta·FDD` against a frozen teacher.

    Args:
        model: the student (a `PreTrainedModel` or a PEFT `PeftModel`), as for `Trainer`.
        teacher_model: the teacher, a model or a local path / Hub id (loaded with `args.teacher_dtype`). It is put
            in eval mode without gradients, placed on the student's device by the trainer's accelerator, and never
            saved. Not needed when `beta = gamma = delta = 0`.
        args: a `DistillationConfig` (a plain `TrainingArguments` is upgraded with the distillation defaults).
        pruned_config: what was pruned; defaults to `PrunedConfig.find_for(model)`. It provides the exact `kept`
            layer map and is written as `pruned_config.json` next to the weights of every save.
        teacher_tokenizer: the teacher's tokenizer, compared with the student's `processing_class` before any work
            (a teacher given as a path brings its own): token ids that stand for different tokens are an error.
        teacher_cache: a teacher cache's folder or `TeacherCache` to distil from instead of a teacher (a
            `train_dataset` with the cached columns is detected without it); see `hf_recover.distill.cached_training`.
        **kwargs: every other `Trainer` argument (`train_dataset`, `data_collator`, `callbacks`, ...).

    Attributes:
        model_card_metrics: before/after figures for the model card written on each save (e.g. the output of
            `hf_recover.recovery_metrics`); set it before `save_model`/`push_to_hub`. `None` leaves them out.
        model_card_datasets: dataset names for the model card.
        layer_map: the student → teacher block map used by alignment and FDD (`None` when both are off).
        projectors: the learnable student → teacher projectors (`None` when not used). They are trained with the
            student, written to `projectors.safetensors` in every checkpoint and restored on resume.

    A PEFT (LoRA) student trains and saves its adapter; `merge_adapters=True` (or `trainer.merge_and_unload()`)
    merges it into the base weights at the end, so that `save_model` writes a plain model.

    With a plain causal-LM student (a transformers model whose loss is the plain CE, no label smoothing, no
    `compute_loss_func`), CE and KD are computed together by `hf_recover.base.losses.distillation_loss`, one pass over
    the logits with a single gradient tensor; otherwise (or with `fused_cross_entropy=False`) CE is Trainer's own.
    Both give the same loss and gradients.

    The logs carry `ce`, `kd`, `align` and `fdd` (each unweighted, `kd` without `T²`; `eval_`-prefixed in
    evaluation) next to Trainer's own `loss`, averaged over the valid tokens since the last log on all processes.
    Training's `loss` is the optimised objective. In evaluation and prediction, `eval_loss` / `test_loss` is the
    student's own language-modelling loss, as plain `Trainer` reports it (so `exp(eval_loss)` is its perplexity),
    and the objective is `eval_distillation_loss` (`eval_objective_as_loss=True` reports the objective as
    `eval_loss` instead). Every one of these names works as `metric_for_best_model`, lower being better.
    """

    pads_labels_by_default = True
    """Without a `data_collator`, batch rows of different lengths with `DataCollatorForSeq2Seq` (labels padded with
    -100) rather than Trainer's `DataCollatorWithPadding`. Subclasses that build their own batches turn it off."""

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        args: DistillationConfig | TrainingArguments | None = None,
        pruned_config: PrunedConfig | None = None,
        teacher_tokenizer=None,
        teacher_cache=None,
        **kwargs,
    ):
        args = DistillationConfig.upgrade(args)
        self._cached_teacher_columns = training_cache_columns(teacher_cache, teacher_model, args, kwargs)
        if (
            self.pads_labels_by_default
            and kwargs.get("data_collator") is None
            and hasattr(kwargs.get("processing_class"), "pad")
        ):
            # Rows of different lengths (chat examples beside prose blocks) are padded, labels with -100: Trainer's
            # default (DataCollatorWithPadding) would leave the labels unpadded.
            kwargs["data_collator"] = DataCollatorForSeq2Seq(
                kwargs["processing_class"], label_pad_token_id=IGNORE_INDEX
            )
        if args.n_gpu > 1:
            # Trainer wraps the student in nn.DataParallel then: the distillation terms would be computed on the
            # gathered logits but scaled as per-replica losses.
            raise ValueError(
                f"DistillationTrainer does not support torch.nn.DataParallel: this process sees {args.n_gpu} GPUs "
                f"and was not launched for distributed training. Launch the script with `torchrun --nproc_per_node "
                f"{args.n_gpu}` or `accelerate launch` (DDP), or make one GPU visible (CUDA_VISIBLE_DEVICES=0)."
            )
        if isinstance(model, (str, os.PathLike)):
            from ..base.loading import load_pruned  # any MLP sizes; plain from_pretrained where they are uniform

            model = load_pruned(model)
        super().__init__(model=model, args=args, **kwargs)

        if self.args.merge_adapters and not is_peft_model(self.model):
            raise ValueError("merge_adapters=True needs a PEFT (LoRA) student; this student has no adapters.")
        self.pruned_config = pruned_config if pruned_config is not None else PrunedConfig.find_for(self.model)
        self._model_card_metrics: dict[str, Any] | None = None
        self.model_card_datasets: list[str] | None = None
        self.loss_terms = LossTerms()
        self._saving_checkpoint = False
        self._evaluating = False  # inside evaluation_loop: compute_loss returns the student's own LM loss
        self._ce_weight = self.args.alpha  # 0 on an on-policy batch (the student's own answers are no targets)
        self._token_clip: float | None = None  # set for on-policy batches with args.on_policy_kl_clip
        self._on_policy_draws = random.Random(self.args.seed)  # which batches are on-policy: reproducible
        self._on_policy_sampling = Sampling(
            temperature=self.args.on_policy_temperature, max_new_tokens=self.args.on_policy_max_new_tokens
        )
        if self.args.lmbda > 0 and self._cached_teacher_columns:
            raise ValueError(
                "lmbda > 0 needs the teacher to score the student's own answers, which a teacher cache cannot: pass "
                "teacher_model= (or set lmbda=0)."
            )
        if self.args.lmbda > 0:
            check_on_policy_inputs(self.args.lmbda, self.train_dataset, self.processing_class)

        if self.args.uses_teacher and teacher_model is not None:
            if teacher_tokenizer is None and isinstance(teacher_model, (str, os.PathLike)):
                teacher_tokenizer = load_teacher_tokenizer(teacher_model)
            check_tokenizers(self.processing_class, teacher_tokenizer)  # before the teacher's weights are loaded
        self.teacher_model = self._prepare_teacher(teacher_model) if self.args.uses_teacher and teacher_model else None
        if self.args.beta > 0 and self.teacher_model is not None:
            check_vocabularies(self.model, self.teacher_model)  # a real tokenizer mismatch fails here, not later
        want_hidden = self.args.wants_hidden_states
        self._teacher_forward_kwargs = {"output_hidden_states": want_hidden, "use_cache": False}
        self._fused_cross_entropy = self._can_fuse_cross_entropy()
        self._fused_heads = (self._can_fuse_lm_head(self.model), self._can_fuse_lm_head(self.teacher_model))
        if self.args.beta == 0 and accepts(self.teacher_model, "logits_to_keep"):
            # Only hidden states are compared: skip the teacher's (tokens × vocab) output projection.
            self._teacher_forward_kwargs["logits_to_keep"] = 1
        self.layer_map, self.projectors, self._layer_pairs = None, None, None
        if want_hidden:
            student_config, teacher_config = text_config(self.model), text_config(self.teacher_model)
            n_s, n_t = student_config.num_hidden_layers, teacher_config.num_hidden_layers
            self.layer_map = build_layer_map(
                self.args.layer_map, student_num_layers=n_s, teacher_num_layers=n_t, pruned_config=self.pruned_config
            )
            self._layer_pairs = layer_map_pairs(self.layer_map, n_s, n_t)  # validated once, used every step
            self.projectors = build_projectors(
                self.args.projector,
                num_student_layers=student_config.num_hidden_layers,
                student_hidden_size=student_config.hidden_size,
                teacher_hidden_size=teacher_config.hidden_size,
            )
        if self.projectors is not None:
            self.projectors.to(self.args.device)
            self.add_callback(_ZeroProjectorGradients(self.projectors))

    @property
    def model_card_metrics(self) -> dict[str, Any] | None:
        return self._model_card_metrics

    @model_card_metrics.setter
    def model_card_metrics(self, metrics: dict[str, Any] | None) -> None:
        from ..publish.card import checked_card_metrics

        checked_card_metrics(metrics)  # when set: an unknown key would otherwise fail at a save mid-training
        self._model_card_metrics = metrics

    def _can_fuse_cross_entropy(self) -> bool:
        """Whether CE can be computed together with KD (`distillation_loss`) instead of by the model: only where
        the result is exactly the model's own loss, a plain causal-LM cross-entropy."""
        has_teacher = self.teacher_model is not None or bool(self._cached_teacher_columns)
        if not self.args.fused_cross_entropy or not has_teacher or self.args.beta == 0:
            return False
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return False  # Trainer's label smoothing or the user's loss function decide the CE
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and (
            getattr(parallelism, "sp_enabled", False) or getattr(parallelism, "cp_enabled", False)
        ):
            return False  # sequence / context parallelism shard the labels: Trainer's path handles them
        problem = plain_loss_problem(self.model)
        if problem is None:
            logger.info("Cross-entropy computed together with the KD term, one pass over the logits.")
        else:
            logger.info("Cross-entropy left to the model: %s.", problem)
        return problem is None

    def _can_fuse_lm_head(self, model: nn.Module | None) -> bool:
        """Whether `model`'s logits can be left to the loss, chunk by chunk (`fused_lm_head`)."""
        if not (self._fused_cross_entropy and self.args.fused_lm_head) or model is None:
            return False
        role = "student" if model is self.model else "teacher"
        problem = fused_head_problem(model)
        if problem is None:
            logger.info("The %s's lm_head runs inside the loss, chunk by chunk: its logits never exist whole.", role)
        else:
            logger.info("The %s's logits are computed whole (%s).", role, problem)
        return problem is None

    # -- the teacher -------------------------------------------------------------------------------------

    def _prepare_teacher(self, teacher: PreTrainedModel | nn.Module | str) -> nn.Module:
        if isinstance(teacher, (str, os.PathLike)):
            teacher = load_teacher(teacher, self.args.teacher_dtype)
        teacher.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed_teacher(teacher, self.accelerator)
        # evaluation_mode: device placement (and autocast under mixed precision) without a DDP wrapper.
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # -- the loss --------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        args = self.args
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("DistillationTrainer needs `labels` in every batch (use a causal-LM collator).")
        inputs = {name: value for name, value in inputs.items() if name != PROMPT_LENGTH_COLUMN}
        want_hidden = args.wants_hidden_states
        inputs, cached_teacher = split_cached_teacher(inputs, self._cached_teacher_columns)
        student_inputs = {**inputs, "output_hidden_states": True} if want_hidden else dict(inputs)
        scale = self._loss_scale(num_items_in_batch)
        # Batches that carry their own `shift_labels` (context parallelism) or ask for router logits keep the
        # model's loss; so do batches without a teacher (cache-only training, evaluated on uncached data).
        fused = self._fused_cross_entropy and not {"shift_labels", "output_router_logits"} & inputs.keys()
        fused = fused and (self.teacher_model is not None or cached_teacher is not None)
        # In training, the fused lm_head leaves each model's logits to the loss, chunk by chunk; evaluation keeps
        # them (prediction_step hands them to compute_metrics).
        student_head, teacher_head = (fused and model.training and enabled for enabled in self._fused_heads)
        with (
            last_block_output(model, want_hidden) as student_last,
            final_hidden_states(model, student_head) as student_final,
        ):
            if fused:
                # CE is computed together with KD, in one pass over the logits (`distillation_loss`): the student
                # runs without labels, so that it computes no loss of its own.
                student_inputs.pop("labels")
                if student_head:
                    student_inputs["logits_to_keep"] = no_logits(labels.device)
                outputs = model(**student_inputs)
                terms, loss = {}, 0
            else:
                # Trainer's own CE (label smoothing, compute_loss_func, num_items_in_batch), already scaled by the
                # number of processes when tokens are averaged across devices; the other terms get the same scale.
                ce_scaled, outputs = super().compute_loss(
                    model, student_inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
                terms, loss = {"ce": ce_scaled / scale}, self._ce_weight * ce_scaled

        if self.teacher_model is not None:
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            if teacher_head:
                teacher_inputs["logits_to_keep"] = no_logits(labels.device)
            with (
                torch.no_grad(),
                last_block_output(self.teacher_model, want_hidden) as teacher_last,
                final_hidden_states(self.teacher_model, teacher_head) as teacher_final,
            ):
                teacher_outputs = self.teacher_model(**{**self._teacher_forward_kwargs, **teacher_inputs})
            student_side = loss_side(model, student_final, outputs)
            teacher_side = loss_side(self.teacher_model, teacher_final, teacher_outputs)
            hidden = None
            if want_hidden:
                # HF's last hidden state is the final norm's output: align the last *block's* raw output instead,
                # like every other block's (block importance does the same).
                hidden = (
                    with_last_block(outputs.hidden_states, student_last),
                    with_last_block(teacher_outputs.hidden_states, teacher_last),
                )
            distill, distill_loss = self._distillation_terms(
                student_side, teacher_side, hidden, labels, num_items_in_batch, scale, fused
            )
            terms.update(distill)
            loss = loss + distill_loss
        elif cached_teacher is not None:  # a teacher cache: KD on its top-k, no teacher forward
            student_side = loss_side(model, student_final, outputs)
            rest = (labels, num_items_in_batch, scale, fused)
            distill, distill_loss = self._distillation_terms(student_side, cached_teacher, None, *rest)
            terms.update(distill)
            loss = loss + distill_loss

        if self._evaluating:
            # In evaluation and prediction the loss is the student's own language-modelling loss, what plain
            # Trainer reports (so exp(eval_loss) is its perplexity); the optimised objective is reported beside it.
            terms[OBJECTIVE_NAME] = loss / scale
            if not args.eval_objective_as_loss:
                loss = terms["ce"] * scale
        self.loss_terms.record(terms, labels, num_items_in_batch, mode="train" if model.training else "eval")
        if not return_outputs:
            return loss
        if want_hidden:
            # Without the hidden states asked for here, which evaluation would gather as predictions.
            return loss, CausalLMOutputWithPast(loss=loss, logits=outputs.logits)
        outputs["loss"] = loss  # the model's own loss (if any) is only the CE part
        return loss, outputs

    def _distillation_terms(
        self, student_side, teacher_side, hidden, labels, num_items_in_batch, scale, fused
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The unweighted terms (for the logs) and their weighted sum, times the Trainer's loss scale."""
        args, terms, loss = self.args, {}, 0
        if args.beta > 0:
            own = args.divergence_kwargs
            common = dict(
                temperature=args.temperature, num_items_in_batch=num_items_in_batch, chunk_size=args.kd_chunk_size
            )
            kd_weight = args.beta * args.temperature**2
            clip = self._token_clip
            if clip is not None:  # an on-policy batch with clipped per-token divergences (no CE: its weight is 0)
                own = {**own, "max_token_divergence": clip}
            if fused or clip is not None:
                # Under --bf16 a fused lm_head multiplies in bfloat16, as the model's own lm_head would have; the
                # divergence and cross-entropy stay float32 (the losses upcast the logits).
                with autocast_to(args.bf16, labels.device):
                    result = distillation_loss(
                        student_side,
                        teacher_side,
                        labels,
                        divergence=args.divergence,
                        ce_weight=self._ce_weight * scale,
                        kd_weight=kd_weight * scale,
                        **common,
                        **own,
                    )
                terms.update(ce=result.ce, kd=result.kd)
                loss = result.loss
            else:
                terms["kd"] = DIVERGENCES[args.divergence](student_side, teacher_side, labels, **common, **own)
                loss = scale * kd_weight * terms["kd"]
        hidden = (*hidden, self._layer_pairs, labels) if hidden is not None else None
        if args.gamma > 0:
            terms["align"] = hidden_alignment_loss(
                *hidden, projectors=self.projectors, kind=args.alignment, num_items_in_batch=num_items_in_batch
            )
            loss = loss + scale * args.gamma * terms["align"]
        if args.delta > 0:
            terms["fdd"] = feature_dynamics_loss(
                *hidden,
                projectors=self.projectors,
                magnitude_weight=args.fdd_magnitude_weight,
                num_items_in_batch=num_items_in_batch,
            )
            loss = loss + scale * args.delta * terms["fdd"]
        return terms, loss

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # the model's forward arguments, the cached teacher's columns
        kept = [*self._cached_teacher_columns, *([PROMPT_LENGTH_COLUMN] if self.args.lmbda > 0 else [])]
        self._signature_columns += [c for c in kept if c not in self._signature_columns]  # and on-policy's prompts

    def _loss_scale(self, num_items_in_batch) -> int:
        """The factor `Trainer.compute_loss` multiplies its loss by when tokens are averaged across devices."""
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return 1

    # -- metrics: recorded per micro-batch, reduced and averaged in `log` -------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs.update(self.loss_terms.averaged("train", self.accelerator))
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Trainer's loop; its metrics gain the components and the objective (`eval_ce`, ...,
        `eval_distillation_loss`; `test_` ones for `predict`), so they also reach `metric_for_best_model`."""
        self.loss_terms.clear("eval")  # nothing recorded outside this loop belongs to it
        self._evaluating = True
        try:
            output = super().evaluation_loop(
                dataloader,
                description,
                prediction_loss_only=prediction_loss_only,
                ignore_keys=ignore_keys,
                metric_key_prefix=metric_key_prefix,
            )
        finally:
            self._evaluating = False
        output.metrics.update(self.loss_terms.averaged("eval", self.accelerator, prefix=f"{metric_key_prefix}_"))
        return output

    # -- projectors: optimised, synchronised, clipped and checkpointed with the student --------------------------

    def create_optimizer(self, model=None):
        user_optimizer = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        if self.projectors is not None:
            params = list(self.projectors.parameters())
            known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            if not known.issuperset(id(p) for p in params):
                if user_optimizer:
                    warnings.warn(
                        "The optimizer passed to DistillationTrainer does not hold trainer.projectors' parameters; "
                        "they are added as an extra parameter group.",
                        stacklevel=2,
                    )
                # No weight decay: it would pull the identity-initialised maps towards zero.
                self.optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        self._ce_weight, self._token_clip = self.args.alpha, None
        if self.args.lmbda > 0 and self._on_policy_draws.random() < self.args.lmbda:
            answered = on_policy_batch(
                self.accelerator.unwrap_model(model), inputs, self.processing_class, self._on_policy_sampling,
                seed=self._on_policy_draws.randrange(2**31),
            )  # fmt: skip
            if answered is not None:  # the student's own answers: the distillation term alone, on their tokens
                inputs, num_items_in_batch, self._ce_weight = answered, None, 0.0
                self._token_clip = self.args.on_policy_kl_clip
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.projectors is not None and self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            # The projectors live outside the DDP-wrapped student: average their gradients as DDP does.
            for param in self.projectors.parameters():
                if param.grad is not None:
                    param.grad = self.accelerator.reduce(param.grad, reduction="mean")
        return loss

    def _clip_grad_norm(self, model):
        if self.projectors is None or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._clip_grad_norm(model)
        params = [*model.parameters(), *self.projectors.parameters()]
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def _save_checkpoint(self, model, trial) -> None:
        self._saving_checkpoint = True  # `_save` then writes the projectors too, so that resuming restores them
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.projectors is None:
            return
        path = Path(resume_from_checkpoint) / PROJECTORS_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint was saved without the projectors this run trains. Resume from "
                "a checkpoint of the same configuration, or start without resume_from_checkpoint."
            )
        from safetensors.torch import load_file

        self.projectors.load_state_dict(load_file(path, device=str(self.args.device)))

    # -- PEFT ----------------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.args.merge_adapters:
            self.merge_and_unload()
        return output

    def merge_and_unload(self) -> PreTrainedModel:
        """Merge a PEFT student's adapters into its base weights; `save_model` then writes a plain model."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(unwrapped):
            raise ValueError("merge_and_unload needs a PEFT (LoRA) student; this student has no adapters.")
        merged = unwrapped.merge_and_unload()
        if getattr(unwrapped, "pruned_config", None) is not None and not hasattr(merged, "pruned_config"):
            merged.pruned_config = unwrapped.pruned_config
        self.model = self.model_wrapped = merged
        return merged


class _ZeroProjectorGradients(TrainerCallback):
    """Trainer zeroes `model`'s gradients after each optimizer step; the projectors live outside it."""

    def __init__(self, projectors: nn.Module):
        self.projectors = projectors

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projectors.zero_grad(set_to_none=True)
