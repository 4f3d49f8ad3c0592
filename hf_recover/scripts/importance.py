"""`hf-recover importance`: score a model's blocks on calibration text and plot the scores.

    hf-recover importance --model default --output_dir out/importance
    hf-recover importance --model default --method angular --n_blocks 6 --output_dir out/angular

Writes `importance.json` (the scores, method, data) and `importance.png` (a bar chart). Low scores
mark blocks that barely change the hidden state: the ones to remove first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..base.loading import load_model
from .arguments import (
    CalibrationArguments,
    OutputArguments,
    check_output_dir,
    command_parser,
    load_text_splits,
    model_field,
)


@dataclass
class ImportanceArguments:
    model: str = model_field()
    method: str = field(default="block_influence", metadata={"help": "block_influence or angular."})
    n_blocks: int = field(default=1, metadata={"help": "Blocks per run for angular distance (the n to remove)."})


def make_parser(subparsers=None):
    types = (ImportanceArguments, CalibrationArguments, OutputArguments)
    return command_parser(subparsers, "importance", types, __doc__, output_dir="outputs/importance")


def main(args: ImportanceArguments, data_args: CalibrationArguments, out: OutputArguments):
    from ..base.data import first_blocks, prepare_recovery_dataset
    from ..prune import block_importance, plot_block_importance

    if args.method not in ("block_influence", "angular"):
        raise ValueError(f"--method must be block_influence or angular, got {args.method!r}.")
    output_dir = check_output_dir(out.output_dir, out.overwrite)
    model, tokenizer = load_model(args.model)
    train = prepare_recovery_dataset(load_text_splits(data_args)["train"], tokenizer, max_length=data_args.max_length)
    calibration = first_blocks(train, data_args.calibration_blocks)
    scores = block_importance(model, calibration, method=args.method, n_blocks=args.n_blocks)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_block_importance(scores, output_dir / "importance.png")
    ranking = sorted(range(len(scores)), key=lambda i: float(scores[i]))
    payload = {
        "model": args.model,
        "method": args.method,
        "n_blocks": args.n_blocks,
        "scores": [round(float(s), 6) for s in scores],
        "ranking_low_to_high": ranking,
        "calibration": f"{len(calibration)} blocks x {data_args.max_length} tokens of {data_args.dataset}",
    }
    (output_dir / "importance.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("block  score")
    for i, s in enumerate(payload["scores"]):
        print(f"{i:5d}  {s:.4f}")
    print(f"\nLeast important first: {ranking}\nScores and plot: {output_dir}")
    return scores
