"""How results are written for people: perplexities, parameter counts, shares, the before/after table and the
training and recovery curves as plots.

The model card, `RecoveryResult.to_markdown`, the candidate report and the strategy lab all write their figures
with these, so the same number reads the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .evaluation import recovery_metrics

MISSING = "—"
"""An unknown value inside a table that has other values (never an empty cell)."""

BEFORE_AFTER_HEADER = ("split", "teacher PPL", "pruned PPL", "healed PPL", "recovered PPL", "recovery", "retention")
MODELS = ("teacher", "pruned", "healed", "recovered")
"""The models a before/after perplexity table compares, in its column order. `pruned` is the cut as made; `healed`
(when the cut was healed before training) the student recovery started from. Recovery % is always measured against
`pruned`: healing and training both count."""


def format_perplexity(value: float | None) -> str:
    """`22.50`; `1,573,730` from 1000 up (the decimals say nothing there); `∞`; `—` when unknown or not a number."""
    if value is None:
        return MISSING
    value = float(value)
    if not math.isfinite(value):
        return "∞" if value > 0 else MISSING
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def format_parameters(count: float | None) -> str:
    """A parameter count with its unit: `134.5M`, `1.2B`, `950.3K`, `512`; `—` when unknown."""
    if count is None:
        return MISSING
    count = float(count)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return f"{count:.0f}"


def format_percent(value: float | None, digits: int = 1, *, sign: bool = False) -> str:
    """A share as a percentage (`0.871` -> `87.1%`, with `sign`: `-21.2%`/`+3.0%`); `—` when unknown or not finite."""
    if value is None or not math.isfinite(float(value)):
        return MISSING
    return f"{float(value):{'+' if sign else ''}.{digits}%}"


def markdown_row(cells: Iterable[Any]) -> str:
    """`| a | b |`: one row of a Markdown table."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, numeric_columns: int = 0) -> str:
    """A Markdown table; its last `numeric_columns` columns hold numbers and are right-aligned."""
    text_columns = len(header) - numeric_columns
    rule = "|" + "---|" * text_columns + "---:|" * numeric_columns
    return "\n".join([markdown_row(header), rule, *(markdown_row(row) for row in rows)])


def before_after_rows(perplexity: Mapping[str, Any] | None) -> list[list[str]]:
    """One row per split of `{split: {"teacher": ppl, "pruned": ppl, "healed": ppl, "recovered": ppl}}` (each value
    optional; the `healed` column is there when some split has it).

    Recovery and retention come from `recovery_metrics` when teacher, pruned and recovered perplexities are known;
    retention alone (`PPL_teacher / PPL_recovered`) needs no pruned perplexity. A split without any is left out.
    """
    if not isinstance(perplexity, Mapping):
        return []
    rows = []
    for split, values in perplexity.items():
        if not isinstance(values, Mapping):
            continue
        teacher, pruned, healed, recovered = (values.get(model) for model in MODELS)
        if teacher is None and pruned is None and healed is None and recovered is None:
            continue
        scores: dict[str, float] = {}
        if None not in (teacher, pruned, recovered):
            try:
                scores = recovery_metrics(float(teacher), float(pruned), float(recovered))
            except ValueError:  # a non-positive perplexity: show the values, not a ratio
                scores = {}
        elif teacher is not None and recovered is not None and float(recovered) > 0:
            scores = {"retention": float(teacher) / float(recovered)}
        rows.append(
            [
                str(split),
                *(format_perplexity(value) for value in (teacher, pruned, healed, recovered)),
                format_percent(scores.get("recovery")),
                format_percent(scores.get("retention")),
            ]
        )
    if not any(isinstance(v, Mapping) and v.get("healed") is not None for v in perplexity.values()):
        rows = [row[:3] + row[4:] for row in rows]  # no split was healed: no column for it
    return rows


def before_after_table(perplexity: Mapping[str, Any] | None) -> str:
    """The before/after table: perplexity of teacher, pruned (healed) and recovered model per split, recovery against
    the pruned one, retention."""
    rows = before_after_rows(perplexity)
    header = BEFORE_AFTER_HEADER if rows and len(rows[0]) == len(BEFORE_AFTER_HEADER) else _WITHOUT_HEALED
    return markdown_table(header, rows, numeric_columns=len(header) - 1)


_WITHOUT_HEALED = tuple(name for name in BEFORE_AFTER_HEADER if name != "healed PPL")


ASSISTANT_HEADER = ("model", "teacher's answers PPL", "log-PPL recovery", "top-1 = teacher's")
OWN_ANSWERS_HEADER = (
    "model",
    "finished",
    "refusals",
    "repeated 4-grams",
    "tokens per answer",
    "teacher log-prob",
    "instructions: prompts",
    "instructions: each",
)


def assistant_rows(assistant: Mapping[str, Mapping[str, Any]] | None) -> list[list[str]]:
    """One row per model of `{model: chat retention figures}` (`hf_recover.base.chat_retention`), teacher-forced on
    the teacher's answers: their perplexity, the share of the log-perplexity gap closed, top-1 agreement."""
    if not isinstance(assistant, Mapping):
        return []
    return [
        [
            str(model),
            format_perplexity(figures.get("perplexity")),
            format_percent(figures.get("log_perplexity_recovery")),
            format_percent(figures.get("top1_agreement")),
        ]
        for model, figures in assistant.items()
    ]


def own_answer_rows(assistant: Mapping[str, Mapping[str, Any]] | None) -> list[list[str]]:
    """One row per model that answered the prompts itself: the share of its answers that finish and that refuse, its
    repeated 4-gram rate, tokens per answer, the teacher's mean log-probability of its answer tokens, and IFEval's
    strict prompt- and instruction-level accuracy; each with its multiple of the teacher's where known."""
    if not isinstance(assistant, Mapping):
        return []
    rows = []
    for model, figures in assistant.items():
        if figures.get("repeated_ngram_rate") is None:
            continue  # it did not answer them all
        logprob = figures.get("teacher_logprob")
        length = figures.get("mean_length")
        rows.append(
            [
                str(model),
                _share(figures, "finish_rate", "finish_ratio"),
                _share(figures, "refusal_rate"),
                _share(figures, "repeated_ngram_rate", "repetition_ratio"),
                _with_ratio(MISSING if length is None else f"{length:.0f}", figures.get("length_ratio")),
                MISSING if logprob is None else f"{logprob:.2f}",
                _share(figures, "instruction_prompt_accuracy", "instruction_prompt_ratio"),
                _share(figures, "instruction_accuracy", "instruction_ratio"),
            ]
        )
    return rows


def _share(figures: Mapping[str, Any], name: str, ratio: str | None = None) -> str:
    return _with_ratio(format_percent(figures.get(name)), figures.get(ratio) if ratio else None)


def _with_ratio(value: str, ratio: float | None) -> str:
    return value if ratio is None or value == MISSING else f"{value} ({ratio:.2f}×)"


def assistant_table(assistant: Mapping[str, Mapping[str, Any]] | None) -> str:
    """The assistant's tables: how close each model stays to the teacher's own answers (`assistant_rows`), then,
    when some model answered the prompts itself, what its own answers are like (`own_answer_rows`)."""
    table = markdown_table(ASSISTANT_HEADER, assistant_rows(assistant), numeric_columns=len(ASSISTANT_HEADER) - 1)
    own = own_answer_rows(assistant)
    if own:
        table += "\n\n" + markdown_table(OWN_ANSWERS_HEADER, own, numeric_columns=len(OWN_ANSWERS_HEADER) - 1)
    return table


def run_facts(result: Any) -> str:
    """One line of a recovery run's facts (a `hf_recover.recovery.RecoveryResult`): parameters before and after, the
    training's steps, tokens and time, the wall time and each phase's, and the type the models computed in."""
    facts = []
    if result.teacher_parameters and result.student_parameters:
        fewer = format_percent(1 - result.student_parameters / result.teacher_parameters)
        before, after = format_parameters(result.teacher_parameters), format_parameters(result.student_parameters)
        facts.append(f"parameters: {before} -> {after} ({fewer} fewer)")
    if result.train_steps is not None:
        facts.append(
            f"training: {result.train_steps} steps, {result.train_tokens:,} tokens, {result.train_runtime:.0f} s"
        )
    if result.wall_time is not None:
        facts.append(f"wall time: {result.wall_time:.0f} s")
    if result.phase_seconds:
        facts.append("phases: " + ", ".join(f"{name} {s:.0f} s" for name, s in result.phase_seconds.items()))
    if result.precision:
        facts.append(f"computed in {result.precision}")
    return "; ".join(facts)


def answers_markdown(answers: Sequence[Mapping[str, str]], *, width: int = 400) -> str:
    """Prompts with each model's answer under them (`[{"prompt": ..., "teacher": ..., "recovered": ...}]`), each
    answer quoted and cut to `width` characters, for reading what the models write side by side."""
    parts = []
    for example in answers:
        lines = [f"**Prompt:** {example['prompt']}"]
        for name, text in example.items():
            if name != "prompt":
                shown = text if len(text) <= width else text[:width] + " [...]"
                lines.append(f"*{name}:*\n" + "\n".join("> " + line for line in (shown or "(no answer)").splitlines()))
        parts.append("\n\n".join(lines))
    return "\n\n".join(parts)


def plot_recovery_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: str | Path) -> Path:
    """Recovery % against training tokens, one line per run (`curves[run][split] = [(tokens, recovery %)]`),
    one panel per split, to a PNG."""
    splits = sorted({split for by_split in curves.values() for split in by_split})
    if not splits:
        raise ValueError("No recovery curve to plot.")
    panels = {
        f"{split} recovery": {
            name: sorted(by_split[split]) for name, by_split in curves.items() if by_split.get(split)
        }
        for split in splits
    }
    return _save_panels(panels, path, xlabel="training tokens", ylabel="recovery %", size=(5.5, 3.8), legend_size=7)


def plot_loss_curves(curves: dict[str, list[dict[str, Any]]], path: str | Path, *, keys=("loss", "ce", "kd")) -> Path:
    """Plot training-log curves (Trainer `log_history` per run) to a PNG: one panel per logged key."""
    keys = [k for k in keys if any(k in entry for history in curves.values() for entry in history)]
    if not keys:
        raise ValueError("The log histories hold none of the keys to plot; set logging_steps so the trainer logs.")
    panels = {}
    for key in keys:
        points = {
            name: [(e["step"], e[key]) for e in history if key in e and "step" in e]
            for name, history in curves.items()
        }
        panels[key] = {name: run for name, run in points.items() if run}
    return _save_panels(panels, path, xlabel="step", size=(5, 3.6), legend_size=8)


def _save_panels(
    panels: dict[str, dict[str, list[tuple[float, float]]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str | None = None,
    size: tuple[float, float],
    legend_size: int,
) -> Path:
    """One PNG, a panel per `panels` entry (its title), a line per run in it: `panels[title][run] = [(x, y), ...]`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(size[0] * len(panels), size[1]), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels.items()):
        for name, points in runs.items():
            ax.plot(*zip(*points), label=name, marker=".")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=legend_size)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
