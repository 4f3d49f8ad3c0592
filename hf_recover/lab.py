"""The strategy lab: what to prune, and how to recover, at equal budgets (`hf-recover compare` prints it).

Every pruning of the lab (a named cut, a healed family of one parameter count, or a prune spec) is recovered by every
strategy (`STRATEGIES`) on the same training rows; each run is measured before training, at evenly spaced budgets
(`RecoveryCurve`, `curve_steps`) and after, against one reference: the pruned perplexity of the first pruning, so that
a better choice of what to prune, or healing, counts fully. `run_lab` runs the protocol and returns its rows;
`lab_table` and `save_lab_results` write them for people.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .base.chat_retention import evaluate_assistant, evaluate_chat_retention, gap_closed
from .base.evaluation import evaluate_splits, recovery_metrics
from .base.precision import autocast_to
from .base.reporting import (
    format_percent,
    format_perplexity,
    markdown_row,
    markdown_table,
    plot_loss_curves,
    plot_recovery_curves,
)
from .distill.config import DistillationConfig
from .prune.spec import DepthSpec, PruneSpec, WidthSpec

_BATCH = "per_device_train_batch_size"
STRATEGIES: dict[str, dict[str, Any]] = {
    # The strategy lab's recovery recipes (DistillationConfig fields). T = 2 throughout.
    "ce_only": {"alpha": 1.0, "beta": 0.0, "gamma": 0.0, "delta": 0.0},
    "logits_kd": {"alpha": 0.5, "beta": 0.5, "gamma": 0.0, "delta": 0.0, "divergence": "forward_kl"},
    "compound": {"alpha": 0.5, "beta": 0.5, "gamma": 0.1, "delta": 0.0, "divergence": "forward_kl"},
    "skew_fdd": {"alpha": 0.5, "beta": 0.5, "gamma": 0.0, "delta": 0.1, "divergence": "skew_forward_kl",
                 "skew_lambda": 0.1},
    # the recipe's loss and optimizer, at the lab's batch size (every strategy gets the same tokens)
    "recommended": {k: v for k, v in DistillationConfig.DEPTH_RECOVERY_RECIPE.items() if k != _BATCH},
}  # fmt: skip
"""Named recovery strategies: CE only, logits KD, compound (CE + KD + hidden alignment), skew KL + FDD, and the
recommended recipe (`DistillationConfig.for_depth_recovery()`, its optimizer settings included)."""

DEPTH_PRUNINGS = ("importance", "last", "angular")
"""Named depth cuts of `n_remove` blocks, as made (unhealed)."""
FAMILIES = ("depth", "width", "mix")
"""Healed students of one parameter count, the depth cut's: the angular span (`depth_heal`), width pruning sized to
its parameters (`width_heads`, `width_hidden`, the MLP taking up the rest; `width_heal`), and half the blocks with
width pruning sized to the same count (keeping the hidden size, then the heads, whole when the count leaves no room
for cutting them)."""


def check_strategies(strategies: Sequence[str]) -> None:
    """Every strategy is one of `STRATEGIES`."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"Unknown strategy {unknown}; strategies: {list(STRATEGIES)}.")


@dataclass(frozen=True)
class LabPrunings:
    """How the lab's named prunings are made: the blocks a depth cut removes, the width axes its families keep, and
    the heals (`"none"`: not healed)."""

    n_remove: int = 6
    width_heads: float = 0.67
    width_hidden: float | None = 0.9375
    depth_heal: str = "lstsq"
    width_heal: str = "lstsq"

    def spec(self, pruning: str, teacher: torch.nn.Module | None = None) -> PruneSpec | None:
        """The prune spec `pruning` names: a named cut, a family (sized on `teacher`; None without it), or a spec
        of its own."""
        if pruning in DEPTH_PRUNINGS:
            return PruneSpec(depth=DepthSpec(method=pruning, n=self.n_remove))
        if pruning not in FAMILIES:
            return PruneSpec.parse(pruning)
        depth_heal = None if self.depth_heal == "none" else self.depth_heal
        width_heal = None if self.width_heal == "none" else self.width_heal
        if pruning == "depth":
            return PruneSpec(depth=DepthSpec(method="angular", n=self.n_remove, heal=depth_heal))
        if teacher is None:
            return None
        from .prune.budget import parameters_at, width_spec_at_parameters

        n_layers = len(teacher.model.layers)
        target = parameters_at(teacher, num_layers=n_layers - self.n_remove)  # the depth cut's parameter count
        blocks = self.n_remove // 2 if pruning == "mix" else 0
        axes = [{"heads": self.width_heads, "hidden_size": self.width_hidden}]
        if pruning == "mix":  # fewer blocks removed leave less to take: keep the hidden size, then the heads, whole
            axes += [{"heads": self.width_heads, "hidden_size": None}, {"heads": None, "hidden_size": None}]
        for tried, fixed in enumerate(axes):
            try:
                width = width_spec_at_parameters(teacher, target, num_layers=n_layers - blocks, **fixed)
                break
            except ValueError:
                if tried == len(axes) - 1:
                    raise
        depth = DepthSpec(method="angular", n=blocks, heal=depth_heal) if blocks else None
        return PruneSpec(depth=depth, width=WidthSpec(**width, heal=width_heal))


ASSISTANT_POINT = "assistant"
"""The key of a curve point's perplexity of the teacher's answers (`RecoveryCurve` with `chat`)."""


class RecoveryCurve(TrainerCallback):
    """Perplexity of the model in training on every split at chosen optimizer steps: the points of a curve of
    recovery against training tokens (`points[step] = {split: perplexity}`; `seconds`: the time they took, which
    the Trainer's `train_runtime` includes; `tokens[step]`: the real tokens trained on by then, when the Trainer counts
    them). With `chat` (a `ChatReference`) and its `tokenizer`, each point also holds the perplexity of the teacher's
    answers under `ASSISTANT_POINT` (teacher-forced, no generation)."""

    def __init__(
        self,
        steps,
        eval_splits: dict[str, Any],
        *,
        batch_size: int = 8,
        max_batches: int | None = None,
        chat=None,
        tokenizer=None,
    ):
        self.steps, self.eval_splits = set(steps), eval_splits
        self.batch_size, self.max_batches = batch_size, max_batches
        self.chat, self.tokenizer = chat, tokenizer
        self.points: dict[int, dict[str, float]] = {}
        self.tokens: dict[int, int] = {}
        self.seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and state.global_step not in self.points:
            start = time.perf_counter()
            scores = evaluate_splits(
                {"model": model}, self.eval_splits, batch_size=self.batch_size, max_batches=self.max_batches
            )
            point = {split: by_model["model"] for split, by_model in scores.items()}
            if self.chat is not None:
                score = evaluate_chat_retention(model, tokenizer=self.tokenizer, reference=self.chat, answer=False)
                point[ASSISTANT_POINT] = score.perplexity
            self.points[state.global_step] = point
            self.tokens[state.global_step] = int(state.num_input_tokens_seen)
            self.seconds += time.perf_counter() - start


def curve_steps(max_steps: int, points: int) -> list[int]:
    """`points` optimizer steps evenly spaced up to `max_steps` (the last one is `max_steps`)."""
    if points < 1:
        raise ValueError(f"A recovery curve needs at least 1 point, got {points}.")
    return sorted({max(1, round(max_steps * (i + 1) / points)) for i in range(points)})


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The fewest training tokens at which a `[(tokens, recovery), ...]` curve reaches `target`; None if never."""
    reached = [tokens for tokens, recovery in sorted(curve) if recovery >= target]
    return reached[0] if reached else None


def run_lab(
    teacher: torch.nn.Module,
    tokenizer,
    specs: dict[str, PruneSpec],
    strategies: Sequence[str],
    config: DistillationConfig,
    *,
    train,
    calibration,
    eval_splits: dict[str, Any],
    output_dir: str | Path,
    max_length: int,
    teacher_dtype: torch.dtype | None = None,
    chat_prompts: str = "none",
    curve_points: int = 3,
    reach: float = 75.0,
    teacher_cache: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Recover every pruning of `specs` (`{name: PruneSpec}`, pruned from the float32 `teacher` and scored and healed
    on `calibration`) with every strategy, on the first `config.max_steps` steps of `train` (the same rows, so the
    same tokens, for every run), and return one row of figures per run.

    `config` is the runs' shared `DistillationConfig` (each strategy sets its own loss); distillation uses the teacher
    in `teacher_dtype`. Each run is measured on `eval_splits` before training, at `curve_points` evenly spaced
    budgets and after, against the pruned perplexity of the first pruning; with `chat_prompts` (`test` or `dev`,
    hf_recover's own prompt sets) and a chat teacher, the assistant too (`assistant_reference`). A row holds
    the tokens its run needed to reach `reach` % recovery. `teacher_cache` (`cache_teacher_outputs`' keywords:
    `top_k`, `tail_samples`, `teacher_name`, `overwrite`) distils every logits-only strategy from one top-k cache
    of the teacher on the lab's rows.
    Writes `block_importance.png` and the training CE per strategy (`recovery_curves_PRUNING.png`) into
    `output_dir`."""
    from .base.chat import has_chat_template
    from .distill.teacher_data import assistant_reference
    from .prune import block_importance, plot_block_importance
    from .recovery import run_recovery

    check_strategies(strategies)
    steps = curve_steps(config.max_steps, curve_points)
    for spec in specs.values():
        spec.check(teacher, calibration)
    output_dir = Path(output_dir)
    # Every run trains on the same rows, the ones its budget consumes (so that one teacher cache covers them all).
    train = train.select(range(min(len(train), config.max_steps * config.rows_per_step)))
    output_dir.mkdir(parents=True, exist_ok=True)
    scores = block_importance(teacher, calibration)
    plot_block_importance(scores, output_dir / "block_importance.png")
    # Students are pruned from the float32 teacher (they train in float32); distillation uses it in teacher_dtype.
    teacher_dtype = teacher_dtype or teacher.dtype
    distilling_teacher = teacher if teacher.dtype == teacher_dtype else _copy_in(teacher, teacher_dtype)
    measured_like_trained = partial(autocast_to, config.bf16, config.device)  # as run_recovery measures
    with measured_like_trained():
        teacher_ppl = evaluate_splits({"teacher": distilling_teacher}, eval_splits)
    chat = None
    if chat_prompts != "none" and has_chat_template(tokenizer):
        chat = assistant_reference(distilling_teacher, tokenizer, chat_prompts)
    with measured_like_trained():
        teacher_chat = (
            evaluate_assistant({"teacher": distilling_teacher}, chat, tokenizer)["teacher"] if chat else None
        )
    tokens_per_step = config.rows_per_step * max_length
    run_configs = {
        strategy: replace(config, **STRATEGIES[strategy], output_dir=str(output_dir / "runs" / strategy))
        for strategy in strategies
    }
    cache = _build_teacher_cache(teacher_cache, run_configs, distilling_teacher, tokenizer, train, output_dir)

    rows, curves, reference, reference_chat = [], {}, None, None
    block_scores = {("block_influence", 1): scores}  # scored once above
    for pruning, spec in specs.items():
        student, pruned_config = spec.build(teacher, calibration, block_scores=block_scores)
        with measured_like_trained():
            pruned_ppl = evaluate_splits({"pruned": student}, eval_splits)
            pruned_chat = (
                evaluate_assistant({"pruned": student}, chat, tokenizer, answer=0)["pruned"] if chat else None
            )
        if reference is None:  # every recovery % is measured against the first pruning's pruned student
            reference = {split: by_model["pruned"] for split, by_model in pruned_ppl.items()}
            reference_chat = pruned_chat
        before = {
            split: {"teacher": teacher_ppl[split]["teacher"], "pruned": reference[split]} for split in eval_splits
        }
        pruned_state = {k: v.clone() for k, v in student.state_dict().items()}
        for strategy in strategies:
            student.load_state_dict(pruned_state)  # every strategy starts from the same pruned student
            run_config = replace(run_configs[strategy], output_dir=str(output_dir / "runs" / f"{pruning}-{strategy}"))
            from_cache = cache is not None and _logits_only(run_config)
            # the last point is run_recovery's own evaluation
            curve = RecoveryCurve(steps[:-1], eval_splits, chat=chat, tokenizer=tokenizer)
            _, result = run_recovery(
                teacher=distilling_teacher, student=student, tokenizer=tokenizer, args=run_config, train_dataset=train,
                eval_splits=eval_splits, pruned_config=pruned_config, before=before, save=False, callbacks=[curve],
                teacher_cache=cache if from_cache else None,
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
                figures["tokens_to_reach"] = tokens_to_reach(figures["curve"], reach)
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
    for pruning, by_strategy in curves.items():
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", pruning)  # a spec such as angular:6:heal=lstsq, as a file name
        plot_loss_curves(by_strategy, output_dir / f"recovery_curves_{name}.png", keys=("ce",))
    return rows


def _copy_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


def _assistant_figures(teacher, reference, pruned, recovered, points: dict, tokens_per_step: int) -> dict:
    """The assistant's figures of one lab run: the perplexity of the teacher's answers before and after, their
    log-perplexity recovery against the reference pruning (at every curve point too), top-1 agreement and the
    repeated 4-gram rate, finish rate, refusal rate and instruction-following (prompt-level) of the recovered
    student's own answers, each with the teacher's."""

    def recovery(nll: float) -> float:
        return 100 * gap_closed(teacher.nll, reference.nll, nll)

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


def _build_teacher_cache(settings, run_configs, teacher, tokenizer, train, output_dir: Path):
    """One top-k cache of the teacher on the lab's training rows, at every temperature a logits-only strategy
    uses; `None` when caching is off or no strategy could read it."""
    from .distill.teacher_cache import cache_teacher_outputs, load_teacher_cache

    temperatures = sorted({c.temperature for c in run_configs.values() if _logits_only(c)})
    if settings is None or not temperatures:
        return None
    folder = cache_teacher_outputs(
        teacher, train, output_dir / "teacher-cache", temperatures=temperatures, tokenizer=tokenizer, packing=True,
        **settings,
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


def lab_table(
    rows: list[dict], eval_splits, config: DistillationConfig, *, max_length: int, reach: float, wall_time: float
) -> str:
    """The lab's results as markdown: the teacher's perplexity and the protocol, then a row per run."""
    header = ["pruning", "strategy", "teacher", "parameters", *(f"{split} PPL (recovery %)" for split in eval_splits)]
    if rows and "assistant" in rows[0]:
        header += ["assistant: teacher's answers PPL (log-PPL recovery %)", "top-1", "repeated 4-grams"]
        header += ["finished (teacher)", "refusals (teacher)", "instructions: prompts (teacher)"]
    header += [f"{next(iter(eval_splits))} tokens to {reach:g}%", "train s"]
    teacher_ppl = {split: rows[0][split]["teacher"] for split in eval_splits} if rows else {}
    teacher = ", ".join(f"{split} {format_perplexity(ppl)}" for split, ppl in teacher_ppl.items())
    table = markdown_table(header, [_row_cells(row, eval_splits) for row in rows], numeric_columns=len(header) - 3)
    tokens = rows[0]["train_tokens"] if rows else 0
    reference = f"the pruned perplexity of `{rows[0]['pruning']}`" if rows else "the first pruning"
    budgets = " / ".join(f"{t:,}" for t, _ in rows[0][list(eval_splits)[0]]["curve"]) if rows else ""
    return (
        f"Teacher perplexity: {teacher}. Each run: {config.max_steps} steps of {config.per_device_train_batch_size} x "
        f"{max_length} tokens ({tokens:,} tokens), learning rate {config.learning_rate} unless the "
        f"strategy sets its own. Recovery % is measured against {reference}, for every row, at {budgets} training "
        "tokens.\n\n" + table + f"\n\nWall time: {wall_time / 60:.1f} min.\n"
    )


def save_lab_results(rows: list[dict], eval_splits, output_dir: str | Path, markdown: str) -> None:
    """`results.md` (the `lab_table`), `results.json` (the rows) and `recovery_vs_tokens.png` into `output_dir`."""
    output_dir = Path(output_dir)
    (output_dir / "results.md").write_text(markdown)
    (output_dir / "results.json").write_text(json.dumps(rows, indent=2, sort_keys=True, default=float) + "\n")
    plot_recovery_curves(
        {f"{row['pruning']} / {row['strategy']}": {s: row[s]["curve"] for s in eval_splits} for row in rows},
        output_dir / "recovery_vs_tokens.png",
    )
