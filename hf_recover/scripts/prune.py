"""`hf-recover prune`: prune a model in depth and/or width and save the student.

    hf-recover prune --model default --prune importance:6 --output_dir out/student
    hf-recover prune --model default --prune remove:3,12,13,14,15,17 --output_dir out/student
    hf-recover prune --model default --prune "importance:4+width:maw:0.2" --output_dir out/student
    hf-recover prune --model default --prune '{"width": {"expansion_rate": 2.0, "divisor": 64}}' ...

The output folder gets the student's weights, tokenizer and `pruned_config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base.loading import load_model
from .arguments import (
    CalibrationArguments,
    OutputArguments,
    check_output_dir,
    command_parser,
    model_field,
)


@dataclass
class PruneArguments:
    model: str = model_field()
    prune: str = field(
        default="importance:6",
        metadata={"help": "What to remove: a prune spec (its grammar: --help, docs/pruning.md)."},
    )


def make_parser(subparsers=None):
    types = (PruneArguments, CalibrationArguments, OutputArguments)
    return command_parser(subparsers, "prune", types, __doc__, takes_prune_specs=True, output_dir="outputs/student")


def main(args: PruneArguments, data_args: CalibrationArguments, out: OutputArguments):
    from ..base.data import first_blocks, prepare_recovery_dataset
    from ..base.evaluation import count_parameters
    from ..prune.spec import PruneSpec
    from .arguments import load_text_splits

    spec = PruneSpec.parse(args.prune)
    output_dir = check_output_dir(out.output_dir, out.overwrite)
    model, tokenizer = load_model(args.model)
    calibration = None
    if spec.needs_calibration:
        train = prepare_recovery_dataset(
            load_text_splits(data_args)["train"], tokenizer, max_length=data_args.max_length
        )
        calibration = first_blocks(train, data_args.calibration_blocks)
    spec.check(model, calibration)
    student, pruned_config = spec.build(model, calibration)
    student.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    pruned_config.save_pretrained(output_dir)
    print(f"kept blocks: {pruned_config.kept_layer_indices}")
    print(f"removed blocks: {pruned_config.removed_layer_indices}")
    print(f"MLP sizes: {pruned_config.student_intermediate_sizes}")
    print(f"parameters: {count_parameters(model):,} -> {count_parameters(student):,}")
    print(f"Student, tokenizer and pruned_config.json: {output_dir}")
    return student, pruned_config
