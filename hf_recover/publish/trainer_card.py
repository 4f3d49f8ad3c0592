"""The model card of a `Trainer` run: everything `Trainer.create_model_card` writes, joined to hf_recover's card.

`training_summary` builds transformers' own `TrainingSummary` of the run, so the hyperparameters, the
training-results table of the log history and the evaluation results are exactly Trainer's; `trainer_run_facts`
turns it into the plain values `generate_model_card(trainer_run=...)` renders; `save_trainer_model_card` is what
the trainer's save hooks, `create_model_card` and `push_to_hub` call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers.modelcard import TrainingSummary, _maybe_round, make_markdown_table

from .card import _as_list, _is_hub_id, save_model_card


def save_trainer_model_card(trainer: Any, output_dir: str | os.PathLike, **card_args) -> Path:
    """Write `trainer`'s card into `output_dir` (merged into a README already there); `card_args` are those of
    `Trainer.create_model_card` (`language`, `license`, `tags`, `model_name`, `finetuned_from`, `tasks`,
    `dataset_tags`, `dataset`, `dataset_args`)."""
    args = trainer.args
    model_name = card_args.pop("model_name", None) or (
        args.hub_model_id.split("/")[-1] if args.hub_model_id else Path(args.output_dir).absolute().name
    )
    summary = training_summary(trainer, model_name=model_name, **card_args)
    return save_model_card(
        output_dir,
        pruned_config=trainer.pruned_config,
        config=args,
        metrics=trainer.model_card_metrics,
        datasets=card_args.get("dataset") or trainer.model_card_datasets,
        model_name=model_name,
        hub_model_id=args.hub_model_id,
        trainer_run=trainer_run_facts(summary) if summary is not None else None,
    )


def training_summary(trainer: Any, **card_args) -> TrainingSummary | None:
    """transformers' `TrainingSummary` of `trainer`'s run; `card_args` are those of `Trainer.create_model_card`.

    Built by `TrainingSummary.from_trainer`, as Trainer's own card is. For a pruned student, `finetuned_from` and
    `license` default to the teacher's (from its `PrunedConfig`); otherwise Trainer infers `finetuned_from` from
    the model. No licence is looked up on the Hub: the card is written on every save. None for a model without a
    `config`.
    """
    if getattr(trainer.model, "config", None) is None:
        return None
    pruned = getattr(trainer, "pruned_config", None)
    if pruned is not None:
        teacher = pruned.teacher_name_or_path
        if not card_args.get("finetuned_from") and teacher and _is_hub_id(teacher):
            card_args["finetuned_from"] = teacher
        card_args["license"] = card_args.get("license") or pruned.license
    # An empty licence skips TrainingSummary's Hub look-up of the base model's licence (a network call per save);
    # from_trainer appends to the tags list it is given.
    card_args.update(license=card_args.get("license") or "", tags=list(_as_list(card_args.get("tags"))) or None)
    summary = TrainingSummary.from_trainer(trainer, **card_args)
    summary.license = summary.license or None
    # Trainer takes an in-memory dataset's missing builder name for a dataset name: drop those.
    summary.dataset_tags = _as_list(summary.dataset_tags) or None
    summary.dataset = _as_list(summary.dataset) or None
    return summary


def trainer_run_facts(summary: TrainingSummary) -> dict[str, Any]:
    """What Trainer's card shows, as the plain values of `generate_model_card(trainer_run=...)`: its metadata, the
    evaluation results and hyperparameters as Trainer formats them, and transformers' own training-results table."""
    return {
        "metadata": summary.create_metadata(),
        "model_name": summary.model_name,
        "finetuned_from": summary.finetuned_from,
        "datasets": _as_list(summary.dataset),
        "eval_results": [(name, _maybe_round(value)) for name, value in (summary.eval_results or {}).items()],
        "hyperparameters": [(name, str(value)) for name, value in (summary.hyperparameters or {}).items()],
        "results_table": make_markdown_table(summary.eval_lines).rstrip() or None,
    }
