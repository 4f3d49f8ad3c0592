"""The recovery run the CLI, the examples, the strategy lab and the benchmarks share: evaluate before and after,
run a `DistillationTrainer`, and report the before/after table and the loss curve (`run_recovery`, `RecoveryResult`).

Names that lived here before moving to the part that owns them are still importable from here: the mixture
(`hf_recover.distill.mixture`), split and assistant evaluation (`hf_recover.distill.evaluation_cache`,
`hf_recover.base.chat_retention`), plots (`hf_recover.base.reporting`) and the strategy lab (`hf_recover.lab`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from .base.chat_retention import answer_examples, chat_retention_table, evaluate_assistant
from .base.evaluation import count_parameters, recovery_metrics
from .base.precision import autocast_to
from .base.reporting import (
    answers_markdown,
    assistant_table,
    before_after_table,
    plot_loss_curves,
    plot_recovery_curves,
    run_facts,
)
from .distill.config import DistillationConfig
from .distill.evaluation_cache import evaluate_splits
from .distill.mixture import PROMPT_ROOM, teacher_mixture

_LAB_NAMES = ("STRATEGIES", "ASSISTANT_POINT", "RecoveryCurve", "curve_steps", "tokens_to_reach")
__all__ = [
    "DEMO_DEFAULTS", "RecoveryResult", "run_recovery",
    # moved to the part that owns them, importable from here as before (and, lazily, the lab's _LAB_NAMES)
    "PROMPT_ROOM", "teacher_mixture", "evaluate_splits", "evaluate_assistant", "answer_examples", "plot_loss_curves",
    "plot_recovery_curves",
]  # fmt: skip

DEMO_DEFAULTS = {
    "teacher": "default",
    # the cut that measures best on this protocol, healed (docs/pruning.md has the figures)
    "prune": "angular:6:heal=local",
    "output_dir": "outputs/demo",
    "max_length": 256,
    "max_train_documents": 400,
    **DistillationConfig.DEPTH_RECOVERY_RECIPE,
    "max_steps": 120,
    # bfloat16 where the hardware computes it natively: it recovers as float32 does, faster (docs/recovery.md)
    "precision": "auto",
}
"""The run of `hf-recover demo` (its flags' values; every other flag keeps `hf-recover recover`'s default): the
protocol the recovery benchmarks share."""


def __getattr__(name: str):
    if name in _LAB_NAMES:  # the strategy lab's names, from before it had a module of its own (it imports this one)
        from . import lab

        return getattr(lab, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class RecoveryResult:
    """Before/after figures of one recovery run, as the model card and the tables read them."""

    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    """`{split: {"teacher": ..., "pruned": ..., "recovered": ...}}`."""
    assistant: dict[str, dict[str, Any]] = field(default_factory=dict)
    """`{"teacher": ..., "pruned": ..., "recovered": ...}`: chat retention against the teacher's own answers
    (`hf_recover.base.chat_retention`), when measured."""
    answers: list[dict[str, str]] = field(default_factory=list)
    """A few prompts answered by each model, `[{"prompt": ..., "teacher": ..., "pruned": ..., "recovered": ...}]`."""
    teacher_parameters: int | None = None
    student_parameters: int | None = None
    train_steps: int | None = None
    train_tokens: int | None = None
    train_runtime: float | None = None
    wall_time: float | None = None
    precision: str | None = None
    """The type the student trained in: "bfloat16" under `--bf16` (every model is then evaluated in it too),
    "float16" under `--fp16` (mixed precision for training only), else "float32"."""
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each phase of `run_recovery`: evaluation before, training, evaluation after."""
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def card_metrics(self) -> dict[str, Any]:
        """The `metrics` dict `hf_recover.generate_model_card` takes."""
        skipped = ("log_history", "wall_time", "phase_seconds", "precision")  # the card reads precision from args
        return {k: v for k, v in asdict(self).items() if k not in skipped and v not in (None, {}, [])}

    def recovery(self, split: str) -> dict[str, float] | None:
        ppl = self.perplexity.get(split, {})
        if {"teacher", "pruned", "recovered"} <= set(ppl):
            return recovery_metrics(ppl["teacher"], ppl["pruned"], ppl["recovered"])
        return None

    def to_markdown(self) -> str:
        """The before/after table (perplexity per split, recovery %, retention), the assistant's tables, parameters
        and time, then a few prompts answered by each model."""
        tables = [before_after_table(self.perplexity)]
        if self.assistant:
            tables.append(assistant_table(self.assistant))
        facts = run_facts(self)
        text = "\n\n".join(tables) + ("\n\n" + facts if facts else "")
        if self.answers:
            text += "\n\nAnswers side by side (greedy):\n\n" + answers_markdown(self.answers)
        return text


def run_recovery(
    *,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    tokenizer,
    args,
    train_dataset,
    eval_splits: dict[str, Any],
    pruned_config=None,
    eval_batch_size: int = 8,
    eval_max_batches: int | None = None,
    before: dict[str, dict[str, float]] | None = None,
    datasets: list[str] | None = None,
    callbacks: list | None = None,
    save: bool = True,
    teacher_cache=None,
    chat=None,
    examples: int = 3,
    cut: torch.nn.Module | None = None,
    on_policy: tuple[Any, Any] | None = None,
) -> tuple[Any, RecoveryResult]:
    """Evaluate teacher and pruned student, recover the student with `DistillationTrainer`, evaluate it.

    `args` is a `DistillationConfig`. `before` reuses teacher/pruned perplexities measured earlier
    (`{split: {"teacher": ..., "pruned": ...}}`), so a lab comparing strategies pays for them once.
    With `save`, the recovered model, tokenizer, `pruned_config.json` and model card are written to
    `args.output_dir`. `teacher_cache` (a `TeacherCache` of `train_dataset`) replaces the teacher in training;
    the teacher is then only evaluated. `chat` (a `ChatReference`: the teacher's answers to evaluation prompts)
    measures the assistant too, before and after, and keeps `examples` prompts answered by every model. `cut` is the
    student as pruned before healing, when it was healed: it is measured as `pruned` and the student as `healed`, so
    that recovery % counts what healing closed too. `on_policy` (a `DistillationConfig`, e.g.
    `DistillationConfig.for_on_policy_phase()`, and its chat rows) is a second training phase after the first, from
    its warm start. The training tokens counted are the real ones (padding excluded). Under `args.bf16` every model
    is evaluated in bfloat16 too (`hf_recover.base.precision`); the result says in which type (`precision`) and how
    long each phase took. Returns `(trainer, result)`.
    """
    from .distill.trainer import DistillationTrainer

    start = time.perf_counter()
    if args.include_num_input_tokens_seen in (False, "no"):  # the tokens trained on, for the results: no padding
        args.include_num_input_tokens_seen = "non_padding"
    # The trainer validates the recipe (layer map, projectors, vocabularies) before any evaluation is spent.
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher if args.uses_teacher and teacher_cache is None else None,
        teacher_cache=teacher_cache,
        args=args,
        pruned_config=pruned_config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    starts = {"teacher": teacher, **({"pruned": cut, "healed": student} if cut is not None else {"pruned": student})}
    bf16, phases = bool(getattr(args, "bf16", False)), {}
    evaluated_like_trained = partial(autocast_to, bf16, trainer.args.device)  # evaluation in the training's type
    with evaluated_like_trained():
        if before is None:  # the same in every run of a protocol: read from the cache after the first
            before = evaluate_splits(
                starts, eval_splits, batch_size=eval_batch_size, max_batches=eval_max_batches, cache=True
            )
        # the starts answer only the examples shown side by side; the recovered student answers every prompt
        assistant = evaluate_assistant(starts, chat, tokenizer, answer=examples) if chat else {}
    phases["evaluation before"] = time.perf_counter() - start
    train_output = trainer.train()
    steps, tokens = trainer.state.global_step, trainer.state.num_input_tokens_seen
    runtime, history = train_output.metrics.get("train_runtime") or 0.0, list(trainer.state.log_history)
    if on_policy is not None:
        phase_args, phase_rows = on_policy
        phase_args.include_num_input_tokens_seen = "non_padding"
        phase = DistillationTrainer(
            model=trainer.model, teacher_model=teacher, args=phase_args, train_dataset=phase_rows,
            processing_class=tokenizer,
        )  # fmt: skip
        phase_output = phase.train()
        steps, tokens = steps + phase.state.global_step, tokens + phase.state.num_input_tokens_seen
        runtime += phase_output.metrics.get("train_runtime") or 0.0
        first = trainer.state.global_step  # the phase's steps continue the first run's in the logs
        history += [{**entry, "step": entry.get("step", 0) + first} for entry in phase.state.log_history]
    phases["training"] = time.perf_counter() - start - phases["evaluation before"]
    with evaluated_like_trained():
        after = evaluate_splits(
            {"recovered": trainer.model}, eval_splits, batch_size=eval_batch_size, max_batches=eval_max_batches
        )
        if chat:
            assistant.update(evaluate_assistant({"recovered": trainer.model}, chat, tokenizer, scorer=teacher))
    phases["evaluation after"] = time.perf_counter() - start - sum(phases.values())
    result = RecoveryResult(
        perplexity={split: {**before[split], **after[split]} for split in eval_splits},
        assistant=chat_retention_table(assistant),
        answers=answer_examples(chat, assistant, tokenizer, examples) if chat else [],
        teacher_parameters=count_parameters(teacher),
        student_parameters=count_parameters(trainer.model),
        train_steps=steps,
        train_tokens=int(tokens),
        train_runtime=runtime,
        log_history=history,
        precision="bfloat16" if bf16 else "float16" if getattr(args, "fp16", False) else "float32",
        phase_seconds=phases,
    )
    result.wall_time = time.perf_counter() - start
    trainer.model_card_metrics = result.card_metrics()
    trainer.model_card_datasets = datasets
    if save:
        trainer.save_model(args.output_dir)
    return trainer, result
