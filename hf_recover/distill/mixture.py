"""The training set of a recovery: the text mixed with the teacher's own answers and samples
(`hf_recover.build_teacher_data`), in the token shares asked for, one conversation per row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..base import constants
from ..base.chat import prepare_chat_dataset
from ..base.data import check_mixture, mix_recovery_datasets
from ..base.generation import Sampling
from .answer_filter import GOOD_ANSWERS, AnswerFilter
from .teacher_data import cached_teacher_data, load_teacher_data

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
    chat_fraction: float = constants.CHAT_FRACTION,
    sample_fraction: float = 0.0,
    num_prompts: int = constants.NUM_PROMPTS,
    num_samples: int = 0,
    answer_tokens: int = constants.ANSWER_TOKENS,
    answer_sampling: Sampling | None = None,
    answers_per_prompt: int = constants.ANSWERS_PER_PROMPT,
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
    check_mixture(chat_fraction, sample_fraction, train_tokens)
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length is the longest chat row in tokens, an int >= 2 (or None), got {max_length!r}.")
    auto = str(teacher_data) == "auto"
    if auto:
        if answer_sampling is None:
            answer_sampling = Sampling(
                constants.ANSWER_TEMPERATURE, constants.ANSWER_TOP_P, max_new_tokens=answer_tokens
            )
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
            held = sum(sum(mask) for mask in parts[kind]["attention_mask"])
            if held < quotas[kind]:
                raise ValueError(
                    f"The teacher data in {folder} holds {held:,} tokens of {kind}s (those the answer filter keeps); "
                    f"the mixture asks for {quotas[kind]:,} ({fraction} of {train_tokens:,}). Write more of them "
                    "(num_prompts / --num_prompts, num_samples / --num_samples, answers_per_prompt), keep longer "
                    "answers (the answer filter's max_answer_tokens / --max_answer_tokens), or lower the "
                    f"{kind} fraction."
                )
    quotas["text"] = train_tokens - sum(quotas.values())
    return mix_recovery_datasets(parts, quotas, seed=seed), folder
