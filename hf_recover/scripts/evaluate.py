"""`hf-recover evaluate`: perplexity, recovery % and retention of a recovered model.

    hf-recover evaluate --model outputs/demo --teacher default --pruned outputs/student
    hf-recover evaluate --model outputs/demo --tasks my_task --include_path examples/lm_eval_tasks

Perplexity is measured on `validation`, `ood` (the default corpus, or --dataset/--ood_dataset) and, with the
default corpus, the held-out domains (--held_out).
With `--teacher` and `--pruned`, recovery % and retention follow. With `--teacher` and a chat template, the
assistant is measured too: every model against the teacher's greedy answers to `--chat_prompts` (perplexity of
those answers, top-1 agreement, repeated 4-grams of its own answers; log-perplexity recovery with `--pruned`).
`--precision bfloat16` (or `auto`) computes in bfloat16 under autocast; the table's last line says which type.
`--tasks` runs lm-eval tasks
(needs `pip install lm-eval`), including local task files from `--include_path` that work offline;
with `--teacher`, capability retention (mean accuracy of the model over the teacher's) is reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..base.loading import load_model
from ..base.precision import PRECISIONS, autocast_to, bf16_supported
from .arguments import (
    EvaluationArguments,
    check_chat_prompts,
    command_parser,
    load_text_splits,
    prepare_eval_splits,
)


@dataclass
class EvaluateArguments:
    model: str = field(
        default="outputs/demo", metadata={"help": "The model to evaluate: folder, Hub id or 'default'."}
    )
    teacher: str | None = field(default=None, metadata={"help": "The teacher, for recovery %% and retention."})
    pruned: str | None = field(default=None, metadata={"help": "The pruned student before recovery."})
    tasks: list[str] | None = field(default=None, metadata={"help": "lm-eval task names (needs lm-eval)."})
    include_path: str | None = field(default=None, metadata={"help": "Folder of local lm-eval task YAML files."})
    limit: int | None = field(default=None, metadata={"help": "lm-eval: examples per task."})
    chat_prompts: str = field(
        default="test",
        metadata={"help": "The assistant's prompts (with --teacher): test, dev (hf_recover's own) or none."},
    )
    output_file: str | None = field(default=None, metadata={"help": "Write the figures as JSON here."})
    precision: str = field(
        default="float32",
        metadata={
            "help": "The type the models compute in: float32, bfloat16, or auto: bfloat16 where the CPU or GPU "
            "computes it natively (AVX512-BF16 or AMX, Ampere on), else float32. The figures themselves are float32."
        },
    )

    def __post_init__(self):
        if self.precision not in PRECISIONS:  # when the flags are read, before any model is loaded
            raise ValueError(f"--precision takes {', '.join(PRECISIONS)}, got {self.precision!r}.")


def make_parser(subparsers=None):
    return command_parser(subparsers, "evaluate", (EvaluateArguments, EvaluationArguments), __doc__)


def main(args: EvaluateArguments, data_args: EvaluationArguments):
    from ..base.chat import has_chat_template
    from ..base.chat_retention import chat_retention_table, evaluate_assistant
    from ..base.evaluation import evaluate_splits
    from ..distill.teacher_data import assistant_reference
    from ..recovery import RecoveryResult

    check_chat_prompts(args.chat_prompts)
    if args.output_file and Path(args.output_file).exists():
        raise ValueError(f"--output_file {args.output_file} exists; choose another path or delete it.")
    if args.tasks:
        from ..base.evaluation import evaluate_lm_eval  # noqa: F401  - fails early with the install hint

    paths = {"recovered": args.model, "teacher": args.teacher, "pruned": args.pruned}
    models, tokenizer = {}, None
    for name, path in paths.items():
        if path is not None:
            models[name], tok = load_model(path)
            tokenizer = tokenizer or tok
    eval_splits = prepare_eval_splits(load_text_splits(data_args), tokenizer, data_args)
    device = next(models["recovered"].parameters()).device
    bf16 = args.precision == "bfloat16" or (args.precision == "auto" and bf16_supported(device))
    with autocast_to(bf16, device):
        result = RecoveryResult(perplexity=evaluate_splits(models, eval_splits))
        result.precision = "bfloat16" if bf16 else "float32"
        if "teacher" in models and args.chat_prompts != "none" and has_chat_template(tokenizer):
            reference = assistant_reference(models["teacher"], tokenizer, args.chat_prompts)
            scores = evaluate_assistant(models, reference, tokenizer)
            result.assistant = chat_retention_table(scores)
    figures = {"perplexity": result.perplexity}
    if result.assistant:
        figures["assistant"] = result.assistant
    for split in eval_splits:
        if (rec := result.recovery(split)) is not None:
            figures[f"recovery_{split}"] = rec
    print(result.to_markdown())

    if args.tasks:
        from ..base.evaluation import capability_retention, evaluate_lm_eval

        scores = {
            name: evaluate_lm_eval(
                models[name], tokenizer, args.tasks, include_path=args.include_path, limit=args.limit
            )
            for name in ("recovered", "teacher")
            if name in models
        }
        figures["lm_eval"] = scores
        for name, per_task in scores.items():
            for task, metrics in per_task.items():
                print(f"{name:10s} {task}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if "teacher" in scores:
            figures["capability_retention"] = capability_retention(scores["teacher"], scores["recovered"])
            print(f"capability retention: {figures['capability_retention']:.1%}")
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_file).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return figures
