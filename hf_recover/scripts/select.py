"""`hf-recover select`: build several pruning candidates, score them cheaply, keep the best.

    hf-recover select --model default --prune importance:4 importance:6 last:6 angular:6
    hf-recover select --model default --prune importance:6 width:maw:0.25 --save_best

Each candidate is scored by perplexity and by KL(teacher || candidate) on held-out `validation`
blocks. Writes `candidates.md` and `candidates.json`; with `--save_best`, also the best student
(weights, tokenizer, `pruned_config.json`) under `best/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base.loading import load_model
from .arguments import OutputArguments, SelectionArguments, check_output_dir, command_parser, model_field


@dataclass
class SelectArguments:
    model: str = model_field()
    prune: list[str] = field(
        default_factory=lambda: ["importance:6", "angular:6", "last:6"],
        metadata={
            "help": "The prune specs to compare (grammar below); --candidates is its former name.",
            "aliases": ["--candidates"],
        },
    )
    rank_by: str = field(default="perplexity", metadata={"help": "perplexity or kl."})
    save_best: bool = field(default=False, metadata={"help": "Save the best candidate under OUTPUT_DIR/best."})


def make_parser(subparsers=None):
    types = (SelectArguments, SelectionArguments, OutputArguments)
    defaults = {"output_dir": "outputs/select", "eval_blocks": 16}
    return command_parser(subparsers, "select", types, __doc__, takes_prune_specs=True, **defaults)


def main(args: SelectArguments, data_args: SelectionArguments, out: OutputArguments):
    from ..base.data import first_blocks, prepare_recovery_dataset
    from ..prune import PruneSpec, select_candidate
    from .arguments import load_text_splits

    specs = {name: PruneSpec.parse(name) for name in args.prune}
    output_dir = check_output_dir(out.output_dir, out.overwrite)
    model, tokenizer = load_model(args.model)
    splits = load_text_splits(data_args)
    train = prepare_recovery_dataset(splits["train"], tokenizer, max_length=data_args.max_length)
    held_out = prepare_recovery_dataset(splits["validation"], tokenizer, max_length=data_args.max_length)
    report = select_candidate(
        model,
        specs,
        first_blocks(held_out, data_args.eval_blocks),
        calibration_data=first_blocks(train, data_args.calibration_blocks),
        rank_by=args.rank_by,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "candidates.md").write_text(report.to_markdown())
    (output_dir / "candidates.json").write_text(report.to_json())
    print(report)
    if args.save_best:
        best = report.best
        best.model.save_pretrained(output_dir / "best")
        tokenizer.save_pretrained(output_dir / "best")
        best.pruned_config.save_pretrained(output_dir / "best")
        print(f"Best candidate ({best.name}) saved to {output_dir / 'best'}")
    return report
