"""Which of the teacher's answers recovery trains on, and what they are like.

Every answer `hf_recover.distill.teacher_data.build_teacher_data` writes is kept with its figures (`finished`,
`refusal`, `repeated_ngram_rate`; `hf_recover.base.answer_quality`). An `AnswerFilter` decides which ones training
reads: by default (`GOOD_ANSWERS`) those that end with the end-of-turn token within 256 tokens, do not refuse and
repeat at most 20% of their 4-grams. A small teacher's greedy answers loop and never stop, and it declines some of the
requests it wrote itself: a student trained on those learns to loop, never to stop, and to refuse; one trained on
answers longer than the budget it answers in does not finish within it. `answer_report` gives the shares the
teacher data's card reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..base.constants import KEPT_ANSWER_TOKENS


@dataclass(frozen=True)
class AnswerFilter:
    """Which of the teacher's answers training reads (see the module docstring); samples are always kept."""

    finished_only: bool = True
    """Drop answers cut at the length limit (they teach the student never to stop)."""
    drop_refusals: bool = True
    """Drop answers that decline or apologise (`hf_recover.base.answer_quality.is_refusal`)."""
    max_repeated_ngram_rate: float | None = 0.2
    """Drop answers whose share of repeated 4-grams exceeds this (None: keep all)."""
    max_answers_per_prompt: int | None = None
    """Keep at most this many of a prompt's answers that pass, the first ones written (None: all)."""
    max_answer_tokens: int | None = None
    """Drop answers longer than this many tokens, end-of-turn included (None: any length). A student learns the
    length of the answers it is trained on: trained on answers longer than the budget it is judged in, it does not
    finish within it."""

    def __post_init__(self):
        rate = self.max_repeated_ngram_rate
        if rate is not None and not 0 <= rate <= 1:
            raise ValueError(f"max_repeated_ngram_rate is a share in [0, 1] or None, got {rate!r}.")
        for name in ("max_answers_per_prompt", "max_answer_tokens"):
            most = getattr(self, name)
            if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 1):
                raise ValueError(f"{name} must be a positive int or None, got {most!r}.")

    def keeps(self, row: dict[str, Any]) -> bool:
        """Whether one row passes (`max_answers_per_prompt` aside, which counts rows)."""
        if row["kind"] != "answer":
            return True
        too_repetitive = self.max_repeated_ngram_rate is not None and (
            row["repeated_ngram_rate"] > self.max_repeated_ngram_rate
        )
        too_long = self.max_answer_tokens is not None and row["answer_tokens"] > self.max_answer_tokens
        return not (
            (self.finished_only and not row["finished"])
            or (self.drop_refusals and row["refusal"])
            or too_repetitive
            or too_long
        )


KEEP_ALL_ANSWERS = AnswerFilter(finished_only=False, drop_refusals=False, max_repeated_ngram_rate=None)
GOOD_ANSWERS = AnswerFilter(max_answer_tokens=KEPT_ANSWER_TOKENS)
"""The answers recovery trains on by default: finished within `KEPT_ANSWER_TOKENS` (256) tokens, no refusal, at most
20% repeated 4-grams."""


def answer_report(rows, answer_filter: AnswerFilter = GOOD_ANSWERS) -> dict[str, Any]:
    """What the teacher's answers in `rows` are like: how many there are, the shares that finish, refuse and repeat
    more 4-grams than `answer_filter` allows, how many prompts and answers the filter keeps, and the kept answers'
    mean length."""
    answers = [row for row in rows.select_columns(list(REPORT_COLUMNS)) if row["kind"] == "answer"]
    if not answers:
        return {}
    kept = filtered_indices(answers, answer_filter)
    count = len(answers)
    most = answer_filter.max_repeated_ngram_rate
    return {
        "answers": count,
        "prompts": len({row["prompt_key"] for row in answers}),
        "finished": sum(row["finished"] for row in answers) / count,
        "refusals": sum(row["refusal"] for row in answers) / count,
        "repetitive": sum(most is not None and row["repeated_ngram_rate"] > most for row in answers) / count,
        "kept_answers": len(kept),
        "kept_prompts": len({answers[i]["prompt_key"] for i in kept}),
        "kept_mean_tokens": sum(answers[i]["answer_tokens"] for i in kept) / len(kept) if kept else 0.0,
        "filter": asdict(answer_filter),
    }


REPORT_COLUMNS = ("kind", "prompt_key", "finished", "refusal", "repeated_ngram_rate", "answer_tokens")


def filtered_indices(rows: Sequence[dict[str, Any]], answer_filter: AnswerFilter) -> list[int]:
    """The indices of the rows `answer_filter` keeps, at most `max_answers_per_prompt` per prompt, first ones first."""
    per_prompt: dict[str, int] = {}
    keep = []
    for index, row in enumerate(rows):
        if not answer_filter.keeps(row):
            continue
        if row["kind"] == "answer" and answer_filter.max_answers_per_prompt is not None:
            seen = per_prompt.get(row["prompt_key"], 0)
            if seen >= answer_filter.max_answers_per_prompt:
                continue
            per_prompt[row["prompt_key"]] = seen + 1
        keep.append(index)
    return keep
