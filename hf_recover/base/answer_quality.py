"""What a model's own answers look like: do they end, refuse, loop, and how long are they.

Teacher-forced figures score a model on the teacher's text; these read what the model writes itself, which is what
its users see (and what on-policy distillation trains on). The same tests choose the teacher data worth training on
(`hf_recover.distill.teacher_data`) and judge the recovered assistant (`hf_recover.base.chat_retention`):

- **finished**: the answer ends with an end-of-turn token within its token budget (an answer cut at the budget
  never stopped on its own);
- **refusal**: the answer declines or apologises instead of answering ("I'm sorry, but as an AI I can't ...").
  Small chat models write these for requests they could answer, and greedy decoding turns a habit learned from a
  fifth of the training answers into the default answer;
- **repeated 4-grams**: the share of an answer's token 4-grams that repeat an earlier one of the same answer
  (`hf_recover.base.chat.repeated_ngram_rate`); a model stuck in a loop repeats nearly all of them. Repetitive
  training targets teach loops (Xu et al., "Learning to Break the Loop", NeurIPS 2022; Li et al., "Repetition In
  Repetition Out", NeurIPS 2023).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .chat import repeated_ngram_rate

REPEAT_N = 4
"""The n of the repeated n-gram rate every answer figure uses."""

REFUSAL_PATTERNS = (
    r"\b(?:I(?:'m| am)|I'm truly|I am truly) sorry\b(?! (?:to hear|for your loss|about your loss))",
    r"^\W*sorry\b",
    r"\b(?:I apologi[sz]e|my apologies)\b",
    r"(?:^|[.!?]\s+)\W*as an? (?:AI|artificial intelligence|(?:large )?language model|chatbot|text-based (?:AI|model|"
    r"assistant)|virtual assistant|digital assistant)\b",
    r"\bI(?:'m| am) (?:just|only) an? (?:AI|language model|chatbot|assistant)\b",
    r"\bI(?:'m| am) (?:unable|not able|not allowed|not permitted|not capable) to (?!help but)",
    r"\bI (?:can ?not|can't|could not|couldn't|won't|will not) (?:help|assist|provide|fulfil|fulfill|comply|create|"
    r"generate|write|answer|do|share|give|discuss|browse|access|send|make)\b(?! but)",
    r"\bI (?:don't|do not) have (?:the )?(?:ability|capability|capacity|access|personal)",
)
"""How a declining or apologising answer begins, in the phrasings instruction-tuned models use (a refusal is judged
on the answer's opening, where a model declines: an answer that apologises in passing later on still answered).
Sympathy ("I'm sorry to hear that"), "as a language model" in the middle of a sentence about one, and "I can't help
but ..." are not refusals."""

REFUSAL_WINDOW = 200
"""Characters from an answer's start that the refusal patterns look at."""

_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE | re.MULTILINE)


def is_refusal(text: str) -> bool:
    """Whether an answer declines or apologises instead of answering (`REFUSAL_PATTERNS` in its opening)."""
    return bool(_REFUSAL.search(text.replace("’", "'")[:REFUSAL_WINDOW]))


def is_finished(completion: Sequence[int], stop_ids: Sequence[int]) -> bool:
    """Whether a completion (token ids, as `generate_completions` returns them) ended with an end-of-turn token."""
    return bool(completion) and completion[-1] in set(stop_ids)


@dataclass(frozen=True)
class AnswerQuality:
    """Figures of a set of answers (see the module docstring). Rates are shares of answers, except the repeated
    4-gram rate, which pools the answers' 4-grams."""

    answers: int
    finish_rate: float
    refusal_rate: float
    repeated_ngram_rate: float
    mean_length: float
    """Mean tokens per answer, its end-of-turn token included."""


def answer_quality(completions: Sequence[Sequence[int]], texts: Sequence[str], stop_ids: Sequence[int]):
    """The `AnswerQuality` of answers given as token ids (`completions`) and as decoded `texts` (same order)."""
    if len(completions) != len(texts):
        raise ValueError(f"Got {len(completions)} completions but {len(texts)} texts: give one text per completion.")
    if not completions:
        raise ValueError("No answers to measure: give at least one.")
    count = len(completions)
    return AnswerQuality(
        answers=count,
        finish_rate=sum(is_finished(c, stop_ids) for c in completions) / count,
        refusal_rate=sum(map(is_refusal, texts)) / count,
        repeated_ngram_rate=repeated_ngram_rate(completions, REPEAT_N),
        mean_length=sum(map(len, completions)) / count,
    )
