"""The recovery workflow the CLI, the examples and the strategy lab share: evaluate before and after,
run a `DistillationTrainer`, and report the before/after table and the loss curve."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .base.chat_retention import answer_prompts, chat_retention_table, evaluate_chat_retention
from .base.constants import (
    ANSWER_TEMPERATURE,
    ANSWER_TOKENS,
    ANSWER_TOP_P,
    ANSWERS_PER_PROMPT,
    CHAT_FRACTION,
    NUM_PROMPTS,
)
from .base.evaluation import count_parameters, evaluate_perplexity, recovery_metrics
from .base.generation import Sampling
from .base.reporting import (
    answers_markdown,
    assistant_table,
    before_after_table,
    format_parameters,
    format_percent,
)
from .distill.answer_filter import GOOD_ANSWERS, AnswerFilter
from .distill.config import DistillationConfig

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


@dataclass
class RecoveryResult:
    """Before/after figures of one recovery run, as the model card and the tables read them."""

    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    """`{split: {"teacher": ..., "pruned": ..., "recovered": ...}}`."""
    assistant: dict[str, dict[str, Any]] = field(default_factory=dict)
    """`{"teacher": ..., "pruned": ..., "recovered": ...}`: chat retention against the teacher's own answers
    (`hf_recover.base.chat_retention`), when measured."""
    answers: list[dict[str, str]] = field(default_factory=list)
    """A few prompts answered by each model, `[{"prompt": ..., "teacher": ..., "pruned": ..., "recovered": ...}]`."""
    teacher_parameters: int | None = None
    student_parameters: int | None = None
    train_steps: int | None = None
    train_tokens: int | None = None
    train_runtime: float | None = None
    wall_time: float | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def card_metrics(self) -> dict[str, Any]:
        """The `metrics` dict `hf_recover.generate_model_card` takes."""
        skipped = ("log_history", "wall_time")
        return {k: v for k, v in asdict(self).items() if k not in skipped and v not in (None, {}, [])}

    def recovery(self, split: str) -> dict[str, float] | None:
        ppl = self.perplexity.get(split, {})
        if {"teacher", "pruned", "recovered"} <= set(ppl):
            return recovery_metrics(ppl["teacher"], ppl["pruned"], ppl["recovered"])
        return None

    def to_markdown(self) -> str:
        """The before/after table (perplexity per split, recovery %, retention), the assistant's tables, parameters
        and time, then a few prompts answered by each model."""
        facts = []
        if self.teacher_parameters and self.student_parameters:
            facts.append(
                f"parameters: {format_parameters(self.teacher_parameters)} -> "
                f"{format_parameters(self.student_parameters)} "
                f"({format_percent(1 - self.student_parameters / self.teacher_parameters)} fewer)"
            )
        if self.train_steps is not None:
            facts.append(
                f"training: {self.train_steps} steps, {self.train_tokens:,} tokens, {self.train_runtime:.0f} s"
            )
        if self.wall_time is not None:
            facts.append(f"wall time: {self.wall_time:.0f} s")
        tables = [before_after_table(self.perplexity)]
        if self.assistant:
            tables.append(assistant_table(self.assistant))
        text = "\n\n".join(tables) + ("\n\n" + "; ".join(facts) if facts else "")
        if self.answers:
            text += "\n\nAnswers side by side (greedy):\n\n" + answers_markdown(self.answers)
        return text


PROMPT_ROOM = 128
"""Tokens a chat row of the mixture leaves for the conversation before the answer: the chat template's system turn
and a prompt the teacher wrote (at most 64 tokens, `PromptFilter`), with room to spare."""


def teacher_mixture(
    teacher: torch.nn.Module,
    tokenizer,
    text: Any,
    *,
    train_tokens: int,
    teacher_data: str | Path = "auto",
    chat_fraction: float = CHAT_FRACTION,
    sample_fraction: float = 0.0,
    num_prompts: int = NUM_PROMPTS,
    num_samples: int = 0,
    answer_tokens: int = ANSWER_TOKENS,
    answer_sampling: Sampling | None = None,
    answers_per_prompt: int = ANSWERS_PER_PROMPT,
    answer_filter: AnswerFilter = GOOD_ANSWERS,
    max_length: int | None = None,
    seed: int = 0,
    overwrite_teacher_data: bool = False,
):
    """A training set of `train_tokens` tokens: `chat_fraction` of them the teacher's answers (one conversation per
    row, the loss on the assistant's tokens only), `sample_fraction` its unconditional samples, the rest `text`
    (prepared blocks). `teacher_data` is a folder of `hf_recover.build_teacher_data`, checked against this teacher and
    tokenizer, or `"auto"`: written by the teacher once with `num_prompts`, `num_samples`, `answers_per_prompt`
    answers to each prompt drawn by `answer_sampling` (by default sampled at `ANSWER_TEMPERATURE`, top-p
    `ANSWER_TOP_P`, up to `answer_tokens`), then read from hf_recover's cache (`overwrite_teacher_data` writes it
    again: a damaged folder). Training reads the answers `answer_filter` keeps (by default `GOOD_ANSWERS`: those
    that finish, do not refuse and do not loop; `KEEP_ALL_ANSWERS`: every one). A conversation longer than
    `max_length` tokens is cut there and loses its end-of-turn token; by default the longest answer fits after a
    prompt of `PROMPT_ROOM` tokens (`answer_tokens + PROMPT_ROOM`). Reading the teacher data writes nothing into
    its folder. Returns `(mixture, teacher_data_folder)`."""
    from .base.chat import prepare_chat_dataset
    from .base.data import check_mixture, mix_recovery_datasets
    from .distill.teacher_data import cached_teacher_data, load_teacher_data

    check_mixture(chat_fraction, sample_fraction, train_tokens)
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length is the longest chat row in tokens, an int >= 2 (or None), got {max_length!r}.")
    auto = str(teacher_data) == "auto"
    if auto:
        if answer_sampling is None:
            answer_sampling = Sampling(ANSWER_TEMPERATURE, ANSWER_TOP_P, max_new_tokens=answer_tokens)
        folder = cached_teacher_data(
            teacher, tokenizer, num_prompts=num_prompts, num_samples=num_samples, seed=seed,
            answers_per_prompt=answers_per_prompt, answer_sampling=answer_sampling,
            stop_loops=answer_filter.finished_only,  # a loop cut short is dropped as unfinished: stop generating it
            sample_sampling=Sampling(temperature=1.0, max_new_tokens=answer_tokens),
            overwrite=overwrite_teacher_data,
        )  # fmt: skip
    else:
        folder = Path(teacher_data)
    try:
        rows = load_teacher_data(folder, teacher=teacher, tokenizer=tokenizer, answer_filter=answer_filter)
    except (FileNotFoundError, ValueError) as err:
        if not auto:
            raise
        hint = "It is hf_recover's cached teacher data: build it again with overwrite_teacher_data=True"
        kind = FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError
        raise kind(f"{err} {hint} (--overwrite_teacher_data).") from err
    parts, quotas = {"text": text}, {}
    for kind, fraction in (("answer", chat_fraction), ("sample", sample_fraction)):
        if fraction > 0:
            chosen = rows.filter(lambda k, kind=kind: k == kind, input_columns="kind")
            if len(chosen) == 0:
                kept = " that the answer filter keeps (its README.md says why)" if kind == "answer" else ""
                raise ValueError(
                    f"The teacher data in {folder} holds no {kind}s{kept}; set the {kind} fraction to 0"
                    + (
                        ", or train on every answer (answer_filter=KEEP_ALL_ANSWERS, --no_filter_answers)."
                        if kept
                        else "."
                    )
                )
            row_length = max_length if max_length is not None else answer_tokens + PROMPT_ROOM
            parts[kind] = prepare_chat_dataset(chosen, tokenizer, max_length=row_length)
            quotas[kind] = round(fraction * train_tokens)
    quotas["text"] = train_tokens - sum(quotas.values())
    return mix_recovery_datasets(parts, quotas, seed=seed), folder


def evaluate_splits(
    models: dict[str, torch.nn.Module],
    splits: dict[str, Any],
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    cache: bool = False,
) -> dict[str, dict[str, float]]:
    """Perplexity of every model on every prepared split: `{split: {model_name: ppl}}`. With `cache`, a model
    measured on a split before (the same weights, tokens and settings: the teacher, the cut, the same heal) is read
    from hf_recover's cache instead (`hf_recover.distill.evaluation_cache`), and the line printed says so."""
    from .distill.evaluation_cache import cached_perplexity, model_fingerprint
    from .distill.fingerprints import dataset_fingerprint

    figures: dict[str, dict[str, float]] = {split: {} for split in splits}
    data_keys = {split: dataset_fingerprint(data) for split, data in splits.items()} if cache else {}
    for name, model in models.items():
        read, model_key = [], model_fingerprint(model) if cache else None
        for split, data in splits.items():
            kwargs = dict(batch_size=batch_size, max_batches=max_batches, desc=f"{name}/{split}")
            if cache:
                figures[split][name], hit = cached_perplexity(
                    model, data, model_key=model_key, data_key=data_keys[split], **kwargs
                )
                read += [split] if hit else []
            else:
                figures[split][name] = evaluate_perplexity(model, data, **kwargs)["perplexity"]
        if read:
            print(f"{name}: perplexity on {', '.join(read)} read from the cache (measured in an earlier run)")
    return figures


def run_recovery(
    *,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    tokenizer,
    args,
    train_dataset,
    eval_splits: dict[str, Any],
    pruned_config=None,
    eval_batch_size: int = 8,
    eval_max_batches: int | None = None,
    before: dict[str, dict[str, float]] | None = None,
    datasets: list[str] | None = None,
    callbacks: list | None = None,
    save: bool = True,
    teacher_cache=None,
    chat=None,
    examples: int = 3,
    cut: torch.nn.Module | None = None,
    on_policy: tuple[Any, Any] | None = None,
) -> tuple[Any, RecoveryResult]:
    """Evaluate teacher and pruned student, recover the student with `DistillationTrainer`, evaluate it.

    `args` is a `DistillationConfig`. `before` reuses teacher/pruned perplexities measured earlier
    (`{split: {"teacher": ..., "pruned": ...}}`), so a lab comparing strategies pays for them once.
    With `save`, the recovered model, tokenizer, `pruned_config.json` and model card are written to
    `args.output_dir`. `teacher_cache` (a `TeacherCache` of `train_dataset`) replaces the teacher in training;
    the teacher is then only evaluated. `chat` (a `ChatReference`: the teacher's answers to evaluation prompts)
    measures the assistant too, before and after, and keeps `examples` prompts answered by every model. `cut` is the
    student as pruned before healing, when it was healed: it is measured as `pruned` and the student as `healed`, so
    that recovery % counts what healing closed too. `on_policy` (a `DistillationConfig`, e.g.
    `DistillationConfig.for_on_policy_phase()`, and its chat rows) is a second training phase after the first, from
    its warm start. The training tokens counted are the real ones (padding excluded). Returns `(trainer, result)`.
    """
    from .distill.trainer import DistillationTrainer

    start = time.perf_counter()
    if args.include_num_input_tokens_seen in (False, "no"):  # the tokens trained on, for the results: no padding
        args.include_num_input_tokens_seen = "non_padding"
    # The trainer validates the recipe (layer map, projectors, vocabularies) before any evaluation is spent.
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher if args.uses_teacher and teacher_cache is None else None,
        teacher_cache=teacher_cache,
        args=args,
        pruned_config=pruned_config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    starts = {"teacher": teacher, **({"pruned": cut, "healed": student} if cut is not None else {"pruned": student})}
    if before is None:  # the same in every run of a protocol: read from the cache after the first
        before = evaluate_splits(
            starts, eval_splits, batch_size=eval_batch_size, max_batches=eval_max_batches, cache=True
        )
    # the starts answer only the examples shown side by side; the recovered student answers every prompt
    assistant = evaluate_assistant(starts, chat, tokenizer, answer=examples) if chat else {}
    train_output = trainer.train()
    steps, tokens = trainer.state.global_step, trainer.state.num_input_tokens_seen
    runtime, history = train_output.metrics.get("train_runtime") or 0.0, list(trainer.state.log_history)
    if on_policy is not None:
        phase_args, phase_rows = on_policy
        phase_args.include_num_input_tokens_seen = "non_padding"
        phase = DistillationTrainer(
            model=trainer.model, teacher_model=teacher, args=phase_args, train_dataset=phase_rows,
            processing_class=tokenizer,
        )  # fmt: skip
        phase_output = phase.train()
        steps, tokens = steps + phase.state.global_step, tokens + phase.state.num_input_tokens_seen
        runtime += phase_output.metrics.get("train_runtime") or 0.0
        first = trainer.state.global_step  # the phase's steps continue the first run's in the logs
        history += [{**entry, "step": entry.get("step", 0) + first} for entry in phase.state.log_history]
    after = evaluate_splits(
        {"recovered": trainer.model}, eval_splits, batch_size=eval_batch_size, max_batches=eval_max_batches
    )
    if chat:
        assistant.update(evaluate_assistant({"recovered": trainer.model}, chat, tokenizer, scorer=teacher))
    result = RecoveryResult(
        perplexity={split: {**before[split], **after[split]} for split in eval_splits},
        assistant=chat_retention_table(assistant),
        answers=answer_examples(chat, assistant, tokenizer, examples) if chat else [],
        teacher_parameters=count_parameters(teacher),
        student_parameters=count_parameters(trainer.model),
        train_steps=steps,
        train_tokens=int(tokens),
        train_runtime=runtime,
        log_history=history,
    )
    result.wall_time = time.perf_counter() - start
    trainer.model_card_metrics = result.card_metrics()
    trainer.model_card_datasets = datasets
    if save:
        trainer.save_model(args.output_dir)
    return trainer, result


def evaluate_assistant(
    models: dict[str, torch.nn.Module], chat, tokenizer, *, answer: bool | int = True, scorer=None
) -> dict[str, Any]:
    """Chat retention of every model against the reference answers `chat` (a `ChatReference`); the model named
    `teacher` is the reference's own, whose figures it carries. `answer`: each model answers every prompt itself
    (True: the own-answer and instruction figures), only the first `answer` prompts (the examples shown side by
    side), or none (0). `scorer` (the teacher, or the model named `teacher`) scores the models' own answers."""
    scores = {}
    for name, model in models.items():
        if name == "teacher" and chat.teacher is not None:
            scores[name] = chat.teacher
            continue
        score = evaluate_chat_retention(
            model, tokenizer=tokenizer, reference=chat, answer=answer is True, scorer=scorer or models.get("teacher")
        )
        if answer is not True and answer:
            score.answers = answer_prompts(model, tokenizer, chat, count=answer)
        scores[name] = score
    return scores


def answer_examples(chat, assistant: dict[str, Any], tokenizer, count: int) -> list[dict[str, str]]:
    """The first `count` prompts with the teacher's answer and each model's own, as text."""
    examples = []
    for i, prompt in enumerate(chat.prompts[:count]):
        example = {"prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"]}
        example["teacher"] = tokenizer.decode(chat.answer_ids[i], skip_special_tokens=True).strip()
        for name, score in assistant.items():
            if name != "teacher" and score.answers:
                example[name] = tokenizer.decode(score.answers[i], skip_special_tokens=True).strip()
        examples.append(example)
    return examples


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
