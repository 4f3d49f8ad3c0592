"""`hf-recover compare`: the strategy lab. What to prune, and how to recover, at equal budgets.

    hf-recover compare --prunings importance angular:6:heal=lstsq --strategies logits_kd recommended
    hf-recover compare --prunings depth width mix --strategies recommended --curve_points 4
    hf-recover compare --prunings importance last --strategies ce_only compound --max_steps 10
    hf-recover compare --max_steps 500 --per_device_train_batch_size 16 --eval_blocks 128   # on a GPU

Prunings (`--prunings`): the named cuts `importance` (the n blocks of lowest block influence), `last` (the last n
blocks) and `angular` (the n contiguous blocks of smallest angular distance), each removing `--n_remove` blocks as
they are; the healed families of one parameter count, the angular cut's: `depth` (that cut healed with
`--depth_heal`), `width` (no block removed: attention heads `--width_heads`, the hidden size `--width_hidden` and the
MLP neurons pruned by activations to the same parameter count, healed with `--width_heal`; see
`hf_recover.prune.budget`) and `mix` (half the blocks, then width pruning to the same count on the same axes where
the count leaves room for them: else the hidden size, then the heads, are kept whole); or any prune spec
(`angular:6:heal=local`). Strategies (`--strategies`): `ce_only`, `logits_kd` (0.5·CE + 0.5·T²·KL), `compound`
(+ 0.1·cosine hidden alignment), `skew_fdd` (skew KL, λ = 0.1, + 0.1·FDD) and `recommended`
(`DistillationConfig.for_depth_recovery()`); see `hf_recover.recovery.STRATEGIES`. Every run trains on the same rows
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

import copy
import json
import re
import time
from dataclasses import dataclass, field

from ..base.evaluation import recovery_metrics
from ..base.loading import load_model, resolve_dtype
from ..base.reporting import format_percent, format_perplexity, markdown_row, markdown_table
from ..distill.config import DistillationConfig
from ..prune.spec import DepthSpec, PruneSpec, WidthSpec
from ..recovery import ASSISTANT_POINT, tokens_to_reach
from .arguments import (
    DEFAULT,
    DataArguments,
    assistant_reference,
    check_chat_prompts,
    check_output_dir,
    command_parser,
    load_text_splits,
    prepare_eval_splits,
)
from .recover import RECOVER_DEFAULTS

DEPTH_PRUNINGS = ("importance", "last", "angular")
"""Named depth cuts of `--n_remove` blocks, as made (unhealed)."""
FAMILIES = ("depth", "width", "mix")
"""Healed students of one parameter count, the depth cut's: the angular span (`--depth_heal`), width pruning sized to
its parameters (`--width_heads`, `--width_hidden`, the MLP taking up the rest; `--width_heal`), and half the blocks
with width pruning sized to the same count (keeping the hidden size, then the heads, whole when the count leaves no
room for cutting them)."""


@dataclass
class CompareArguments:
    teacher: str = field(default=DEFAULT, metadata={"help": "'default' (embedded SmolLM2), a folder or a Hub id."})
    prunings: list[str] = field(
        default_factory=lambda: list(DEPTH_PRUNINGS),
        metadata={
            "help": "importance, last, angular (cuts as made); depth, width, mix (healed families of one parameter "
            "count); or prune specs (angular:6:heal=lstsq)."
        },
    )
    strategies: list[str] = field(
        default_factory=lambda: ["ce_only", "logits_kd", "compound", "skew_fdd"],
        metadata={"help": "Recovery strategies (hf_recover.recovery.STRATEGIES)."},
    )
    n_remove: int = field(default=6, metadata={"help": "Blocks to remove (6 of 30 = 20%%)."})
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
    return command_parser(
        subparsers,
        "compare",
        (CompareArguments, DataArguments, DistillationConfig),
        __doc__,
        takes_prune_specs=True,
        **COMPARE_DEFAULTS,
    )


def _pruning_spec(pruning: str, args: CompareArguments, teacher=None) -> PruneSpec | None:
    """The prune spec a `--prunings` entry names: a named cut, a family (sized on `teacher`; None without it), or
    a spec of its own."""
    if pruning in DEPTH_PRUNINGS:
        return PruneSpec(depth=DepthSpec(method=pruning, n=args.n_remove))
    if pruning not in FAMILIES:
        return PruneSpec.parse(pruning)
    depth_heal = None if args.depth_heal == "none" else args.depth_heal
    width_heal = None if args.width_heal == "none" else args.width_heal
    if pruning == "depth":
        return PruneSpec(depth=DepthSpec(method="angular", n=args.n_remove, heal=depth_heal))
    if teacher is None:
        return None
    from ..prune.budget import parameters_at, width_spec_at_parameters

    n_layers = len(teacher.model.layers)
    target = parameters_at(teacher, num_layers=n_layers - args.n_remove)  # the depth cut's parameter count
    blocks = args.n_remove // 2 if pruning == "mix" else 0
    axes = [{"heads": args.width_heads, "hidden_size": args.width_hidden}]
    if pruning == "mix":  # fewer blocks removed leave less to take: keep the hidden size, then the heads, whole
        axes += [{"heads": args.width_heads, "hidden_size": None}, {"heads": None, "hidden_size": None}]
    for tried, fixed in enumerate(axes):
        try:
            width = width_spec_at_parameters(teacher, target, num_layers=n_layers - blocks, **fixed)
            break
        except ValueError:
            if tried == len(axes) - 1:
                raise
    depth = DepthSpec(method="angular", n=blocks, heal=depth_heal) if blocks else None
    return PruneSpec(depth=depth, width=WidthSpec(**width, heal=width_heal))


def main(args: CompareArguments, data_args: DataArguments, config: DistillationConfig):
    from dataclasses import replace

    from ..base.chat import has_chat_template
    from ..base.data import prepare_recovery_dataset
    from ..prune import block_importance, plot_block_importance
    from ..recovery import (
        STRATEGIES,
        RecoveryCurve,
        curve_steps,
        evaluate_assistant,
        evaluate_splits,
        plot_loss_curves,
        plot_recovery_curves,
        run_recovery,
    )

    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"Unknown strategy {unknown}; strategies: {list(STRATEGIES)}.")
    specs = {pruning: _pruning_spec(pruning, args) for pruning in args.prunings}  # bad specs fail here
    check_chat_prompts(args.chat_prompts)
    steps = curve_steps(config.max_steps, args.curve_points)
    output_dir = check_output_dir(config.output_dir, args.overwrite)
    start = time.perf_counter()

    teacher, tokenizer = load_model(args.teacher)
    specs = {pruning: spec or _pruning_spec(pruning, args, teacher) for pruning, spec in specs.items()}
    splits = load_text_splits(data_args)
    train = prepare_recovery_dataset(splits["train"], tokenizer, max_length=data_args.max_length)
    calibration = train.select(range(min(data_args.calibration_blocks, len(train))))
    for spec in specs.values():
        spec.check(teacher, calibration)
    # Every run trains on the same rows, the ones its budget consumes (so that one teacher cache covers them all).
    rows_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size
    train = train.select(range(min(len(train), config.max_steps * rows_per_step)))
    eval_splits = prepare_eval_splits(splits, tokenizer, data_args)
    output_dir.mkdir(parents=True, exist_ok=True)
    scores = block_importance(teacher, calibration)
    plot_block_importance(scores, output_dir / "block_importance.png")
    # Students are pruned from the float32 teacher (they train in float32); distillation uses it in teacher_dtype.
    teacher_dtype = resolve_dtype(args.teacher, config.teacher_dtype)
    distilling_teacher = teacher if teacher.dtype == teacher_dtype else copy.deepcopy(teacher).to(teacher_dtype)
    teacher_ppl = evaluate_splits({"teacher": distilling_teacher}, eval_splits)
    chat = None
    if args.chat_prompts != "none" and has_chat_template(tokenizer):
        chat = assistant_reference(distilling_teacher, tokenizer, args.chat_prompts)
        teacher_chat = evaluate_assistant({"teacher": distilling_teacher}, chat, tokenizer)["teacher"]
    tokens_per_step = rows_per_step * data_args.max_length
    run_configs = {
        strategy: replace(config, **STRATEGIES[strategy], output_dir=str(output_dir / "runs" / strategy))
        for strategy in args.strategies
    }
    teacher_cache = _build_teacher_cache(args, run_configs, distilling_teacher, tokenizer, train, output_dir)

    rows, curves, reference = [], {}, None
    block_scores = {("block_influence", 1): scores}  # scored once above
    for pruning, spec in specs.items():
        student, pruned_config = spec.build(teacher, calibration, block_scores=block_scores)
        pruned_ppl = evaluate_splits({"pruned": student}, eval_splits)
        pruned_chat = evaluate_assistant({"pruned": student}, chat, tokenizer, answer=0)["pruned"] if chat else None
        if reference is None:  # every recovery % is measured against the first pruning's pruned student
            reference = {split: by_model["pruned"] for split, by_model in pruned_ppl.items()}
            reference_chat = pruned_chat
        before = {
            split: {"teacher": teacher_ppl[split]["teacher"], "pruned": reference[split]} for split in eval_splits
        }
        pruned_state = {k: v.clone() for k, v in student.state_dict().items()}
        for strategy in args.strategies:
            student.load_state_dict(pruned_state)  # every strategy starts from the same pruned student
            run_config = replace(run_configs[strategy], output_dir=str(output_dir / "runs" / f"{pruning}-{strategy}"))
            from_cache = teacher_cache is not None and _logits_only(run_config)
            # the last point is run_recovery's own evaluation
            curve = RecoveryCurve(steps[:-1], eval_splits, chat=chat, tokenizer=tokenizer)
            _, result = run_recovery(
                teacher=distilling_teacher, student=student, tokenizer=tokenizer, args=run_config, train_dataset=train,
                eval_splits=eval_splits, pruned_config=pruned_config, before=before, save=False, callbacks=[curve],
                teacher_cache=teacher_cache if from_cache else None,
            )  # fmt: skip
            curves.setdefault(pruning, {})[strategy] = result.log_history
            row = {"pruning": pruning, "removed": pruned_config.removed_layer_indices, "strategy": strategy}
            row["teacher"] = "cache" if from_cache else ("online" if run_config.uses_teacher else "none")
            row.update(parameters=pruned_config.student_num_parameters, spec=spec.to_dict())
            points = {0: {s: by_model["pruned"] for s, by_model in pruned_ppl.items()}, **curve.points}
            points[result.train_steps] = {split: result.perplexity[split]["recovered"] for split in eval_splits}
            points = sorted(points.items())
            for split in eval_splits:
                figures = row[split] = {**result.perplexity[split], "pruned": pruned_ppl[split]["pruned"]}
                figures.update(result.recovery(split) or {})  # against the reference pruned perplexity
                figures["pruned_retention"] = figures["teacher"] / figures["pruned"]
                figures["curve"] = [(step * tokens_per_step, _recovery(before[split], p[split])) for step, p in points]
                figures["tokens_to_reach"] = tokens_to_reach(figures["curve"], args.reach)
            if chat is not None:
                recovered_chat = evaluate_assistant(
                    {"recovered": student}, chat, tokenizer, scorer=distilling_teacher
                )["recovered"]
                row["assistant"] = _assistant_figures(
                    teacher_chat, reference_chat, pruned_chat, recovered_chat, curve.points, tokens_per_step
                )
                row["assistant"]["curve"].append((result.train_tokens, row["assistant"]["recovery"]))
            row.update(train_tokens=result.train_tokens, train_runtime=result.train_runtime - curve.seconds)
            rows.append(row)
            print(markdown_row(_row_cells(row, eval_splits)), flush=True)

    markdown = _table(rows, eval_splits, config, data_args, args, time.perf_counter() - start)
    (output_dir / "results.md").write_text(markdown)
    (output_dir / "results.json").write_text(json.dumps(rows, indent=2, sort_keys=True, default=float) + "\n")
    for pruning, by_strategy in curves.items():
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", pruning)  # a spec such as angular:6:heal=lstsq, as a file name
        plot_loss_curves(by_strategy, output_dir / f"recovery_curves_{name}.png", keys=("ce",))
    plot_recovery_curves(
        {f"{row['pruning']} / {row['strategy']}": {s: row[s]["curve"] for s in eval_splits} for row in rows},
        output_dir / "recovery_vs_tokens.png",
    )
    print("\n" + markdown)
    return rows


def _assistant_figures(teacher, reference, pruned, recovered, points: dict, tokens_per_step: int) -> dict:
    """The assistant's figures of one lab run: the perplexity of the teacher's answers before and after, their
    log-perplexity recovery against the reference pruning (at every curve point too), top-1 agreement and the
    repeated 4-gram rate, finish rate, refusal rate and instruction-following (prompt-level) of the recovered
    student's own answers, each with the teacher's."""
    import math

    def recovery(nll: float) -> float:
        return 100 * (reference.nll - nll) / (reference.nll - teacher.nll)

    curve = [(0, recovery(pruned.nll))]
    curve += [(step * tokens_per_step, recovery(math.log(p[ASSISTANT_POINT]))) for step, p in sorted(points.items())]
    return {
        "pruned": pruned.perplexity,
        "recovered": recovered.perplexity,
        "recovery": recovery(recovered.nll),
        "top1_agreement": recovered.top1_agreement,
        "repeated_ngram_rate": recovered.repeated_ngram_rate,
        "teacher_repeated_ngram_rate": teacher.repeated_ngram_rate,
        **{name: getattr(recovered, name) for name in OWN_ANSWER_FIGURES},
        **{f"teacher_{name}": getattr(teacher, name) for name in OWN_ANSWER_FIGURES},
        "curve": curve,
    }


OWN_ANSWER_FIGURES = ("finish_rate", "refusal_rate", "instruction_prompt_accuracy")
"""What the lab's table shows of the recovered student's own answers, beside the teacher's."""


def _logits_only(config: DistillationConfig) -> bool:
    """Whether a run needs the teacher's logits alone (a cache can stand in for the teacher)."""
    return config.beta > 0 and not config.wants_hidden_states


def _build_teacher_cache(args, run_configs, teacher, tokenizer, train, output_dir):
    """One top-k cache of the teacher on the lab's training rows, at every temperature a logits-only strategy
    uses; `None` when caching is off or no strategy could read it."""
    from ..distill.teacher_cache import cache_teacher_outputs, load_teacher_cache

    temperatures = sorted({c.temperature for c in run_configs.values() if _logits_only(c)})
    if not args.cache_teacher or not temperatures:
        return None
    folder = cache_teacher_outputs(
        teacher, train, output_dir / "teacher-cache", top_k=args.cache_top_k, temperatures=temperatures,
        tail_samples=args.cache_tail_samples,
        tokenizer=tokenizer, packing=True, teacher_name=args.teacher, overwrite=args.overwrite,
    )  # fmt: skip
    return load_teacher_cache(folder, tokenizer=tokenizer, dataset=train)


def _recovery(before: dict[str, float], ppl: float) -> float:
    """Recovery % of a perplexity against `before`'s teacher and (reference) pruned perplexity."""
    return 100 * recovery_metrics(before["teacher"], before["pruned"], ppl)["recovery"]


def _curve_cell(pruned: float, recovered: float, curve: list[tuple[int, float]]) -> str:
    """`pruned → recovered PPL (recovery at each budget)`, e.g. `30.76 → 23.88 (61.5 / 76.6 / 85.6%)`."""
    recoveries = " / ".join(f"{value:.1f}" for _, value in curve)
    return f"{format_perplexity(pruned)} → {format_perplexity(recovered)} ({recoveries}%)"


def _row_cells(row: dict, eval_splits) -> list[str]:
    cells = [row["pruning"], row["strategy"], row["teacher"], f"{row['parameters'] / 1e6:.1f}M"]
    for split in eval_splits:
        r = row[split]
        cells.append(_curve_cell(r["pruned"], r["recovered"], r["curve"]))
    if "assistant" in row:
        a = row["assistant"]
        ratio = (
            a["repeated_ngram_rate"] / a["teacher_repeated_ngram_rate"] if a["teacher_repeated_ngram_rate"] else None
        )
        cells += [
            _curve_cell(a["pruned"], a["recovered"], a["curve"]),
            format_percent(a["top1_agreement"]),
            format_percent(a["repeated_ngram_rate"]) + (f" ({ratio:.1f}×)" if ratio is not None else ""),
            *(f"{format_percent(a.get(n))} ({format_percent(a.get(f'teacher_{n}'))})" for n in OWN_ANSWER_FIGURES),
        ]
    reach = row[next(iter(eval_splits))].get("tokens_to_reach")
    cells += ["-" if reach is None else f"{reach:,}", f"{row['train_runtime']:.0f}"]
    return cells


def _table(rows: list[dict], eval_splits, config, data_args, args, wall_time: float) -> str:
    header = ["pruning", "strategy", "teacher", "parameters", *(f"{split} PPL (recovery %)" for split in eval_splits)]
    if rows and "assistant" in rows[0]:
        header += ["assistant: teacher's answers PPL (log-PPL recovery %)", "top-1", "repeated 4-grams"]
        header += ["finished (teacher)", "refusals (teacher)", "instructions: prompts (teacher)"]
    header += [f"{next(iter(eval_splits))} tokens to {args.reach:g}%", "train s"]
    teacher_ppl = {split: rows[0][split]["teacher"] for split in eval_splits} if rows else {}
    teacher = ", ".join(f"{split} {format_perplexity(ppl)}" for split, ppl in teacher_ppl.items())
    table = markdown_table(header, [_row_cells(row, eval_splits) for row in rows], numeric_columns=len(header) - 3)
    tokens = rows[0]["train_tokens"] if rows else 0
    reference = f"the pruned perplexity of `{rows[0]['pruning']}`" if rows else "the first pruning"
    budgets = " / ".join(f"{t:,}" for t, _ in rows[0][list(eval_splits)[0]]["curve"]) if rows else ""
    return (
        f"Teacher perplexity: {teacher}. Each run: {config.max_steps} steps of {config.per_device_train_batch_size} x "
        f"{data_args.max_length} tokens ({tokens:,} tokens), learning rate {config.learning_rate} unless the "
        f"strategy sets its own. Recovery % is measured against {reference}, for every row, at {budgets} training "
        "tokens.\n\n" + table + f"\n\nWall time: {wall_time / 60:.1f} min.\n"
    )
