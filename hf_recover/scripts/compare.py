"""`hf-recover compare`: the strategy lab. What to prune, and how to recover, at equal budgets.

    hf-recover compare --prune importance angular:6:heal=lstsq --strategies logits_kd recommended
    hf-recover compare --prune depth width mix --strategies recommended --curve_points 4
    hf-recover compare --prune importance last --strategies ce_only compound --max_steps 10
    hf-recover compare --max_steps 500 --per_device_train_batch_size 16 --eval_blocks 128   # on a GPU

Prunings (`--prune`): the named cuts `importance` (the n blocks of lowest block influence), `last` (the last n
blocks) and `angular` (the n contiguous blocks of smallest angular distance), each removing `--n_remove` blocks as
they are; the healed families of one parameter count, the angular cut's: `depth` (that cut healed with
`--depth_heal`), `width` (no block removed: attention heads `--width_heads`, the hidden size `--width_hidden` and the
MLP neurons pruned by activations to the same parameter count, healed with `--width_heal`; see
`hf_recover.prune.budget`) and `mix` (half the blocks, then width pruning to the same count on the same axes where
the count leaves room for them: else the hidden size, then the heads, are kept whole); or any prune spec
(`angular:6:heal=local`). Strategies (`--strategies`): `ce_only`, `logits_kd` (0.5·CE + 0.5·T²·KL), `compound`
(+ 0.1·cosine hidden alignment), `skew_fdd` (skew KL, λ = 0.1, + 0.1·FDD) and `recommended`
(`DistillationConfig.for_depth_recovery()`); see `hf_recover.lab.STRATEGIES`. Every run trains on the same rows
(the first `max_steps × batch` packed blocks, in the Trainer's seeded order), so on the same tokens.

Recovery % is measured against one reference for every row, the pruned perplexity of the first pruning listed, so a
better choice of what to prune, or healing, counts fully; each run is evaluated before training and at
`--curve_points` evenly spaced budgets, on every evaluation split and, with a chat teacher, on the teacher's answers
to `--chat_prompts` (the assistant columns: log-perplexity recovery, top-1 agreement, repeated 4-grams of the
recovered student's own answers). `--cache_teacher` distils every logits-only strategy from one top-k cache of the
teacher on the lab's rows (`hf_recover.cache_teacher_outputs`; `results.json` says which runs did). Writes
`results.md`, `results.json` (with the tokens each run needed to reach `--reach` % recovery),
`recovery_vs_tokens.png`, `recovery_curves_PRUNING.png` (the training CE per strategy) and `block_importance.png`
into `--output_dir`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..base.loading import load_model, resolve_dtype
from ..distill.config import DistillationConfig
from ..lab import DEPTH_PRUNINGS, LabPrunings
from .arguments import (
    DataArguments,
    check_chat_prompts,
    check_output_dir,
    command_parser,
    load_text_splits,
    model_field,
    prepare_eval_splits,
)
from .recover import RECOVER_DEFAULTS


@dataclass
class CompareArguments:
    teacher: str = model_field()
    prune: list[str] = field(
        default_factory=lambda: list(DEPTH_PRUNINGS),
        metadata={
            "help": "importance, last, angular (cuts as made); depth, width, mix (healed families of one parameter "
            "count); or prune specs (angular:6:heal=lstsq). --prunings is its former name.",
            "aliases": ["--prunings"],
        },
    )
    strategies: list[str] = field(
        default_factory=lambda: ["ce_only", "logits_kd", "compound", "skew_fdd"],
        metadata={"help": "Recovery strategies (hf_recover.lab.STRATEGIES)."},
    )
    n_remove: int = field(
        default=6,
        metadata={"help": "Blocks to remove (6 of SmolLM2's 30: 20%% of the blocks, 15.8%% of the parameters)."},
    )
    curve_points: int = field(
        default=3, metadata={"help": "Evaluate each run at this many evenly spaced budgets (1: at the end only)."}
    )
    cache_teacher: bool = field(
        default=False,
        metadata={
            "help": "Run the teacher once: cache its top-k on the lab's training rows and train every logits-only "
            "strategy (gamma = delta = 0) from the cache."
        },
    )
    cache_top_k: int = field(default=64, metadata={"help": "Teacher tokens kept per position in the cache."})
    cache_tail_samples: int | None = field(
        default=None,
        metadata={"help": "Tail tokens sampled per position into the cache (see `hf-recover cache`; default 16)."},
    )
    reach: float = field(
        default=75.0, metadata={"help": "Report the tokens each run needed to reach this recovery %%."}
    )
    width_heads: float = field(
        default=0.67,
        metadata={"help": "`width` pruning: the fraction of query heads kept per block (0.67: 6 of SmolLM2's 9)."},
    )
    width_hidden: float | None = field(
        default=0.9375,
        metadata={"help": "`width` pruning: the fraction of the hidden size kept (0.9375: 540 of 576)."},
    )
    depth_heal: str = field(
        default="lstsq", metadata={"help": "The heal of the `depth` and `mix` families: lstsq, cosine, local or none."}
    )
    width_heal: str = field(
        default="lstsq", metadata={"help": "The heal of the `width` and `mix` families: lstsq or none."}
    )
    chat_prompts: str = field(
        default="test",
        metadata={"help": "Prompts the assistant columns are measured on: test, dev (hf_recover's own) or none."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Write into a non-empty --output_dir (files of the same name are replaced)."}
    )


COMPARE_DEFAULTS = {
    **RECOVER_DEFAULTS,  # the same optimizer settings as `hf-recover recover`, at a smaller budget per run
    "output_dir": "outputs/lab",
    "max_steps": 40,  # 40 steps of 2 x 256 tokens: 20,480 tokens per run
    "logging_steps": 2,
    "max_length": 256,
    "max_train_documents": 400,
    "eval_blocks": 16,
}


def make_parser(subparsers=None):
    types = (CompareArguments, DataArguments, DistillationConfig)
    return command_parser(subparsers, "compare", types, __doc__, takes_prune_specs=True, **COMPARE_DEFAULTS)


def prunings(args: CompareArguments) -> LabPrunings:
    """How the lab makes the prunings `--prune` names."""
    return LabPrunings(
        n_remove=args.n_remove, width_heads=args.width_heads, width_hidden=args.width_hidden,
        depth_heal=args.depth_heal, width_heal=args.width_heal,
    )  # fmt: skip


def main(args: CompareArguments, data_args: DataArguments, config: DistillationConfig):
    from ..base.data import first_blocks, prepare_recovery_dataset
    from ..lab import check_strategies, curve_steps, lab_table, run_lab, save_lab_results

    check_strategies(args.strategies)
    named = prunings(args)
    specs = {pruning: named.spec(pruning) for pruning in args.prune}  # bad specs fail here
    check_chat_prompts(args.chat_prompts)
    curve_steps(config.max_steps, args.curve_points)
    output_dir = check_output_dir(config.output_dir, args.overwrite)
    start = time.perf_counter()

    teacher, tokenizer = load_model(args.teacher)
    specs = {pruning: spec or named.spec(pruning, teacher) for pruning, spec in specs.items()}
    splits = load_text_splits(data_args)
    train = prepare_recovery_dataset(splits["train"], tokenizer, max_length=data_args.max_length)
    cache = None
    if args.cache_teacher:
        cache = dict(
            top_k=args.cache_top_k, tail_samples=args.cache_tail_samples, teacher_name=args.teacher,
            overwrite=args.overwrite,
        )  # fmt: skip
    eval_splits = prepare_eval_splits(splits, tokenizer, data_args)
    rows = run_lab(
        teacher, tokenizer, specs, args.strategies, config, train=train,
        calibration=first_blocks(train, data_args.calibration_blocks), eval_splits=eval_splits, output_dir=output_dir,
        max_length=data_args.max_length, teacher_dtype=resolve_dtype(args.teacher, config.teacher_dtype),
        chat_prompts=args.chat_prompts, curve_points=args.curve_points, reach=args.reach, teacher_cache=cache,
    )  # fmt: skip
    markdown = lab_table(
        rows, eval_splits, config, max_length=data_args.max_length, reach=args.reach,
        wall_time=time.perf_counter() - start,
    )  # fmt: skip
    save_lab_results(rows, eval_splits, output_dir, markdown)
    print("\n" + markdown)
    return rows
