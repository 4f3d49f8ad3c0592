"""`hf-recover compare`: the strategy lab. Which blocks to remove, and how to recover, at equal budgets.

    hf-recover compare                                       # about 50 minutes on 2 CPU cores
    hf-recover compare --prunings importance last --strategies ce_only compound --max_steps 10
    hf-recover compare --max_steps 500 --per_device_train_batch_size 16 --eval_blocks 128   # on a GPU

Pruning choices (`--prunings`): `importance` (the n blocks of lowest block influence), `last` (the last
n blocks), `angular` (the n contiguous blocks of smallest angular distance), each removing `--n_remove`
blocks. Recovery strategies (`--strategies`): `ce_only`, `logits_kd` (0.5·CE + 0.5·T²·KL),
`compound` (+ 0.1·cosine hidden alignment) and `skew_fdd` (skew KL, λ = 0.1, + 0.1·FDD); see
`hf_recover.recovery.STRATEGIES`. Every run gets the same steps, batch and sequence length, so the same
tokens. Writes `results.md`, `results.json`, `recovery_curves.png` (the student's training CE per
strategy, one panel per pruning) and `block_importance.png` into `--output_dir`.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field

from ..config import DistillationConfig
from ..loading import load_model, resolve_dtype
from ..reporting import format_percent, format_perplexity, markdown_row, markdown_table
from .arguments import (
    DEFAULT,
    DataArguments,
    check_output_dir,
    command_parser,
    load_text_splits,
    prepare_eval_splits,
)
from .recover import RECOVER_DEFAULTS

PRUNINGS = ("importance", "last", "angular")


@dataclass
class CompareArguments:
    teacher: str = field(default=DEFAULT, metadata={"help": "'default' (embedded SmolLM2), a folder or a Hub id."})
    prunings: list[str] = field(default_factory=lambda: list(PRUNINGS), metadata={"help": f"Of {PRUNINGS}."})
    strategies: list[str] = field(
        default_factory=lambda: ["ce_only", "logits_kd", "compound", "skew_fdd"],
        metadata={"help": "Recovery strategies (hf_recover.recovery.STRATEGIES)."},
    )
    n_remove: int = field(default=6, metadata={"help": "Blocks to remove (6 of 30 = 20%%)."})
    overwrite: bool = field(
        default=False, metadata={"help": "Write into a non-empty --output_dir (files of the same name are replaced)."}
    )


COMPARE_DEFAULTS = {
    **RECOVER_DEFAULTS,  # the same optimizer settings as `hf-recover recover`, at a smaller budget per run
    "output_dir": "outputs/lab",
    "max_steps": 20,
    "logging_steps": 2,
    "max_length": 256,
    "max_train_documents": 400,
    "eval_blocks": 16,
}


def make_parser(subparsers=None):
    return command_parser(
        subparsers, "compare", (CompareArguments, DataArguments, DistillationConfig), __doc__, **COMPARE_DEFAULTS
    )


def main(args: CompareArguments, data_args: DataArguments, config: DistillationConfig):
    from dataclasses import replace

    from ..data import prepare_recovery_dataset
    from ..pruning import block_importance, plot_block_importance
    from ..recovery import STRATEGIES, build_student, evaluate_splits, plot_loss_curves, run_recovery

    unknown = [p for p in args.prunings if p not in PRUNINGS] + [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(
            f"Unknown pruning or strategy {unknown}; prunings: {PRUNINGS}, strategies: {list(STRATEGIES)}."
        )
    output_dir = check_output_dir(config.output_dir, args.overwrite)
    start = time.perf_counter()

    teacher, tokenizer = load_model(args.teacher)
    splits = load_text_splits(data_args)
    train = prepare_recovery_dataset(splits["train"], tokenizer, max_length=data_args.max_length)
    calibration = train.select(range(min(data_args.calibration_blocks, len(train))))
    eval_splits = prepare_eval_splits(splits, tokenizer, data_args)
    output_dir.mkdir(parents=True, exist_ok=True)
    scores = block_importance(teacher, calibration)
    plot_block_importance(scores, output_dir / "block_importance.png")
    # Students are pruned from the float32 teacher (they train in float32); distillation uses it in teacher_dtype.
    teacher_dtype = resolve_dtype(args.teacher, config.teacher_dtype)
    distilling_teacher = teacher if teacher.dtype == teacher_dtype else copy.deepcopy(teacher).to(teacher_dtype)
    teacher_ppl = evaluate_splits({"teacher": distilling_teacher}, eval_splits)

    rows, curves = [], {}
    for pruning in args.prunings:
        spec = {"depth": {"method": pruning, "n": args.n_remove}}
        if pruning == "importance":
            spec["depth"]["scores"] = scores  # scored once above
        student, pruned_config = build_student(teacher, spec, data=calibration)
        pruned_ppl = evaluate_splits({"pruned": student}, eval_splits)
        before = {split: {**teacher_ppl[split], **pruned_ppl[split]} for split in eval_splits}
        pruned_state = {k: v.clone() for k, v in student.state_dict().items()}
        for strategy in args.strategies:
            student.load_state_dict(pruned_state)  # every strategy starts from the same pruned student
            run_config = replace(
                config, **STRATEGIES[strategy], output_dir=str(output_dir / "runs" / f"{pruning}-{strategy}")
            )
            _, result = run_recovery(
                teacher=distilling_teacher, student=student, tokenizer=tokenizer, args=run_config, train_dataset=train,
                eval_splits=eval_splits, pruned_config=pruned_config, before=before, save=False,
            )  # fmt: skip
            curves.setdefault(pruning, {})[strategy] = result.log_history
            row = {"pruning": pruning, "removed": pruned_config.removed_layer_indices, "strategy": strategy}
            for split in eval_splits:
                rec = result.recovery(split)
                row[split] = {**result.perplexity[split], **(rec or {})}
            row.update(train_tokens=result.train_tokens, train_runtime=result.train_runtime)
            rows.append(row)
            print(markdown_row(_row_cells(row, eval_splits)), flush=True)

    markdown = _table(rows, eval_splits, config, data_args, time.perf_counter() - start)
    (output_dir / "results.md").write_text(markdown)
    (output_dir / "results.json").write_text(json.dumps(rows, indent=2, sort_keys=True, default=float) + "\n")
    for pruning, by_strategy in curves.items():
        plot_loss_curves(by_strategy, output_dir / f"recovery_curves_{pruning}.png", keys=("ce",))
    print("\n" + markdown)
    return rows


def _row_cells(row: dict, eval_splits) -> list[str]:
    cells = [row["pruning"], row["strategy"]]
    for split in eval_splits:
        r = row[split]
        cells += [format_perplexity(r["pruned"]), format_perplexity(r["recovered"]), format_percent(r.get("recovery"))]
    cells.append(f"{row['train_runtime']:.0f}")
    return cells


def _table(rows: list[dict], eval_splits, config, data_args, wall_time: float) -> str:
    header = ["pruning", "strategy"]
    for split in eval_splits:
        header += [f"{split} pruned PPL", f"{split} recovered PPL", f"{split} recovery"]
    header.append("train s")
    teacher_ppl = {split: rows[0][split]["teacher"] for split in eval_splits} if rows else {}
    teacher = ", ".join(f"{split} {format_perplexity(ppl)}" for split, ppl in teacher_ppl.items())
    table = markdown_table(header, [_row_cells(row, eval_splits) for row in rows], numeric_columns=len(header) - 2)
    tokens = rows[0]["train_tokens"] if rows else 0
    return (
        f"Teacher perplexity: {teacher}. Each run: {config.max_steps} steps of {config.per_device_train_batch_size} x "
        f"{data_args.max_length} tokens ({tokens:,} tokens), learning rate {config.learning_rate}.\n\n"
        + table
        + f"\n\nWall time: {wall_time / 60:.1f} min.\n"
    )
