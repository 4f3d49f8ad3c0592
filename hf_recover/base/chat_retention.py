"""Is the recovered model still the assistant? Chat retention against the teacher's own answers.

Text perplexity overstates how much of a chat model a pruned student keeps (Minitron's depth-pruned 4B kept 34.6%
of its teacher's GSM8K while its MMLU was close to the width variant's). These figures look at the assistant:

- the teacher answers every prompt greedily through its chat template (`chat_reference`);
- each model is scored teacher-forced on those answers: their perplexity given the prompt, and how often its most
  likely next token is the teacher's (top-1 agreement);
- each model answers the same prompts greedily itself, and its answers are read as a user would
  (`hf_recover.base.answer_quality`): how many end with the end-of-turn token within the budget, how many refuse,
  how often they repeat a 4-gram (a model stuck in a loop repeats almost every one), how long they are, and how
  likely the teacher finds them (its mean log-probability of the model's own answer tokens, a reverse-KL proxy:
  student-sampled, teacher-scored, it sees drift that teacher-forced figures hide);
- with instruction prompts (`hf_recover.base.instruction_following`), each model answers them too, and IFEval's
  verifiers score whether it followed their instructions.

Every own-answer figure pools the answers to both prompt sets; the teacher's figures on the same prompts come with
the reference, so each is read against the teacher's.

Recovery of the answers' log-perplexity, `(log PPL_pruned − log PPL) / (log PPL_pruned − log PPL_teacher)`, is the
share of the gap in nats per answer token that recovery closed.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch
from tqdm.auto import tqdm

from .answer_quality import REPEAT_N, answer_quality
from .chat import check_prompts, end_of_turn_ids, pad_id, render_prompt, repeated_ngram_rate
from .constants import IGNORE_INDEX
from .generation import Sampling, generate_completions, right_padded
from .instruction_following import check_instruction_prompts, score_instruction_following

CHAT_PROMPTS_FILE = "chat_prompts.json"
PROMPT_SETS = ("dev", "test")
INSTRUCTION_ANSWER_TOKENS = 256
"""Longest answer to an instruction prompt, in tokens (IFEval's answers are longer than a chat prompt's)."""


def load_chat_prompts(split: str = "test") -> list[str]:
    """hf_recover's own evaluation prompts: everyday requests written by hand, in two disjoint sets, `"dev"` (for
    choosing recipes) and `"test"` (for reporting them). Neither is ever trained on."""
    if split not in PROMPT_SETS:
        raise ValueError(f"split must be one of {list(PROMPT_SETS)}, got {split!r}.")
    text = resources.files("hf_recover.base.defaults").joinpath(CHAT_PROMPTS_FILE).read_text(encoding="utf-8")
    return list(json.loads(text)[split])


@dataclass
class ChatRetention:
    """How close a model stays to the teacher as an assistant (see the module docstring)."""

    perplexity: float
    """Perplexity of the teacher's answers given their prompts (teacher-forced)."""
    nll: float
    """Mean negative log-likelihood of an answer token, in nats."""
    top1_agreement: float
    """Share of answer tokens where the model's most likely next token is the teacher's."""
    repeated_ngram_rate: float | None
    """Share of repeated 4-grams in the model's own greedy answers (None when it did not answer)."""
    repetition_ratio: float | None
    """`repeated_ngram_rate` over the teacher's own."""
    tokens: int
    finish_rate: float | None = None
    """Share of the model's own answers that end with an end-of-turn token within the budget."""
    refusal_rate: float | None = None
    """Share of the model's own answers that decline or apologise (`hf_recover.base.answer_quality`)."""
    mean_length: float | None = None
    """Mean tokens per own answer."""
    teacher_logprob: float | None = None
    """The teacher's mean log-probability of the model's own answer tokens (a reverse-KL proxy; None without a
    teacher to score them)."""
    instruction_prompt_accuracy: float | None = None
    """IFEval's strict prompt-level accuracy on the instruction prompts (every instruction of a prompt followed)."""
    instruction_accuracy: float | None = None
    """IFEval's strict instruction-level accuracy (the share of instructions followed)."""
    loose_instruction_prompt_accuracy: float | None = None
    loose_instruction_accuracy: float | None = None
    answers: list[list[int]] = field(default_factory=list, repr=False)
    """The model's own greedy answers (token ids) to the chat prompts, when it answered."""
    instruction_answers: list[list[int]] = field(default_factory=list, repr=False)
    """The model's own greedy answers to the instruction prompts, when it answered."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("answers", "instruction_answers")}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ChatRetention:
        return cls(**{name: values[name] for name in cls.__dataclass_fields__ if name in values})


@dataclass
class ChatReference:
    """The teacher's greedy answers to prompts, which chat retention is measured against."""

    prompts: list[Any]
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    repeated_ngram_rate: float
    """The teacher's own share of repeated 4-grams in these answers."""
    max_new_tokens: int
    teacher: ChatRetention | None = None
    """The teacher's own figures on these answers (teacher-forced; its greedy answers are these)."""
    instructions: list[dict[str, Any]] = field(default_factory=list)
    """Prompts with verifiable instructions, in IFEval's format (none: no instruction following measured)."""
    instruction_prompt_ids: list[list[int]] = field(default_factory=list)
    instruction_answer_ids: list[list[int]] = field(default_factory=list)
    """The teacher's greedy answers to the instruction prompts."""
    instruction_max_new_tokens: int = INSTRUCTION_ANSWER_TOKENS
    stop_ids: list[int] = field(default_factory=list)
    """The end-of-turn tokens an answer finishes with."""

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["teacher"] = self.teacher.to_dict() if self.teacher is not None else None
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ChatReference:
        teacher = values.get("teacher")
        given = {name: values[name] for name in cls.__dataclass_fields__ if name in values and name != "teacher"}
        reference = cls(**given)
        if teacher is not None:
            reference.teacher = ChatRetention.from_dict(teacher)
            reference.teacher.answers = reference.answer_ids
            reference.teacher.instruction_answers = reference.instruction_answer_ids
        return reference


def chat_reference(
    teacher: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any] | None = None,
    *,
    instructions: Sequence[Mapping[str, Any]] = (),
    max_new_tokens: int = 128,
    instruction_max_new_tokens: int = INSTRUCTION_ANSWER_TOKENS,
    batch_size: int = 48,
) -> ChatReference:
    """The teacher's greedy answers to `prompts` (hf_recover's `test` prompts by default), up to `max_new_tokens`,
    and to the `instructions` (IFEval items, e.g. `load_instruction_prompts("test")`; none by default), up to
    `instruction_max_new_tokens`, with the teacher's own figures on them."""
    prompts = check_prompts(load_chat_prompts("test") if prompts is None else prompts, tokenizer)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt to answer.")
    instructions = check_instruction_prompts(instructions)
    prompt_ids = [render_prompt(tokenizer, p) for p in prompts]
    stop_ids = end_of_turn_ids(teacher, tokenizer)
    answers = _answer(teacher, tokenizer, prompt_ids, max_new_tokens, batch_size, "Teacher's answers")
    if not any(answers):
        raise ValueError("The teacher gave no answer to any prompt: nothing to measure retention against.")
    reference = ChatReference(
        prompts, prompt_ids, answers, repeated_ngram_rate(answers, REPEAT_N), max_new_tokens,
        instructions=instructions, instruction_max_new_tokens=instruction_max_new_tokens, stop_ids=stop_ids,
        instruction_prompt_ids=[render_prompt(tokenizer, item["prompt"]) for item in instructions],
    )  # fmt: skip
    reference.instruction_answer_ids = _answer(
        teacher, tokenizer, reference.instruction_prompt_ids, instruction_max_new_tokens, batch_size, "Instructions"
    )
    own = (answers, reference.instruction_answer_ids)
    reference.teacher = _retention(teacher, reference, tokenizer, own, scorer=teacher, batch_size=8)
    return reference


def evaluate_chat_retention(
    model: torch.nn.Module,
    *former_order: Any,
    tokenizer: Any = None,
    teacher: torch.nn.Module | None = None,
    prompts: Sequence[Any] | None = None,
    reference: ChatReference | None = None,
    instructions: Sequence[Mapping[str, Any]] = (),
    answer: bool = True,
    scorer: torch.nn.Module | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    generation_batch_size: int = 48,
) -> ChatRetention:
    """Chat retention of `model` against `teacher`'s greedy answers to `prompts` (see the module docstring):
    `evaluate_chat_retention(model, tokenizer, teacher=..., prompts=...)`, model and tokenizer first like
    `evaluate_lm_eval` and `chat_reference`.

    Give `teacher`, `prompts` (strings or message lists; hf_recover's `test` prompts by default), `instructions`
    (IFEval items, none by default) and `tokenizer`, or a `reference` from `chat_reference` (computed once, shared
    by every model measured against it). `answer=False` skips the model's own greedy answers (no own-answer or
    instruction figures): scoring alone is much cheaper than generating. `scorer` (the teacher; `teacher` when
    given) scores the model's own answers for the reverse-KL proxy. The former positional order
    `(model, teacher, prompts, tokenizer)` still works, with a `FutureWarning`, until hf_recover 1.0.
    """
    if former_order:
        tokenizer, teacher, prompts = _positional(former_order, tokenizer, teacher, prompts)
    if tokenizer is None:
        raise ValueError("evaluate_chat_retention needs the tokenizer (the prompts go through its chat template).")
    if reference is None:
        if teacher is None:
            raise ValueError("Give the teacher (its greedy answers are the reference) or a reference=.")
        reference = chat_reference(
            teacher, tokenizer, prompts, instructions=instructions, max_new_tokens=max_new_tokens
        )
    own = None
    if answer:
        own = (
            answer_prompts(model, tokenizer, reference, batch_size=generation_batch_size),
            _answer(model, tokenizer, reference.instruction_prompt_ids, reference.instruction_max_new_tokens,
                    generation_batch_size, "Own answers (instructions)"),
        )  # fmt: skip
    return _retention(model, reference, tokenizer, own, scorer=scorer or teacher, batch_size=batch_size)


def _positional(values: tuple, tokenizer: Any, teacher: Any, prompts: Any) -> tuple[Any, Any, Any]:
    """`(tokenizer, teacher, prompts)` from `evaluate_chat_retention`'s positional arguments after the model: the
    tokenizer alone, or the former `(teacher, prompts, tokenizer)`."""
    if not isinstance(values[0], torch.nn.Module) and not (values[0] is None and len(values) > 1):
        if len(values) > 1 or tokenizer is not None:
            raise TypeError(
                "evaluate_chat_retention takes the model and the tokenizer positionally; give teacher=, prompts= "
                "and the rest by keyword."
            )
        return values[0], teacher, prompts
    if len(values) > 3 or teacher is not None or (len(values) > 1 and prompts is not None):
        raise TypeError("evaluate_chat_retention got the teacher or the prompts twice (positionally and by keyword).")
    if len(values) == 3 and tokenizer is not None:
        raise TypeError("evaluate_chat_retention got the tokenizer twice (positionally and by keyword).")
    warnings.warn(
        "evaluate_chat_retention(model, teacher, prompts, tokenizer) is the former order; write "
        "evaluate_chat_retention(model, tokenizer, teacher=teacher, prompts=prompts) (the former goes in 1.0).",
        FutureWarning,
        stacklevel=3,
    )
    former = (*values, None, None)
    return (values[2] if len(values) == 3 else tokenizer), former[0], (former[1] if len(values) > 1 else prompts)


def answer_prompts(
    model: torch.nn.Module, tokenizer: Any, reference: ChatReference, *, count: int | None = None, batch_size: int = 48
) -> list[list[int]]:
    """`model`'s own greedy answers (token ids) to the first `count` of the reference's prompts (all by default),
    as long as the teacher's could be."""
    prompt_ids = reference.prompt_ids[:count]
    return _answer(model, tokenizer, prompt_ids, reference.max_new_tokens, batch_size, "Own answers")


def evaluate_assistant(
    models: dict[str, torch.nn.Module], chat: ChatReference, tokenizer, *, answer: bool | int = True, scorer=None
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


def _retention(model, reference: ChatReference, tokenizer, own, *, scorer=None, batch_size: int) -> ChatRetention:
    """The figures of `model` on the reference; `own` (its answers to the chat and to the instruction prompts, or
    None) gives the own-answer figures, and `scorer` (the teacher) the reverse-KL proxy."""
    nll, agree, tokens = _score_answers(model, reference.prompt_ids, reference.answer_ids, tokenizer, batch_size)
    mean_nll = nll / tokens
    score = ChatRetention(
        perplexity=math.exp(mean_nll), nll=mean_nll, top1_agreement=agree / tokens, repeated_ngram_rate=None,
        repetition_ratio=None, tokens=tokens,
    )  # fmt: skip
    if own is None:
        return score
    answers, instruction_answers = own
    score.answers, score.instruction_answers = answers, instruction_answers
    completions = [*answers, *instruction_answers]
    texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
    stop_ids = reference.stop_ids or end_of_turn_ids(model, tokenizer)
    quality = answer_quality(completions, texts, stop_ids)
    score.finish_rate, score.refusal_rate = quality.finish_rate, quality.refusal_rate
    score.repeated_ngram_rate, score.mean_length = quality.repeated_ngram_rate, quality.mean_length
    teacher_rate = repeated_ngram_rate([*reference.answer_ids, *reference.instruction_answer_ids], REPEAT_N)
    score.repetition_ratio = score.repeated_ngram_rate / teacher_rate if teacher_rate > 0 else None
    if scorer is not None:
        prompts = [*reference.prompt_ids, *reference.instruction_prompt_ids]
        own_nll, _, own_tokens = _score_answers(scorer, prompts, completions, tokenizer, batch_size)
        score.teacher_logprob = -own_nll / own_tokens if own_tokens else None
    if reference.instructions:
        followed = score_instruction_following(reference.instructions, texts[len(answers) :])
        score.instruction_prompt_accuracy = followed.prompt_accuracy
        score.instruction_accuracy = followed.instruction_accuracy
        score.loose_instruction_prompt_accuracy = followed.loose_prompt_accuracy
        score.loose_instruction_accuracy = followed.loose_instruction_accuracy
    return score


def log_perplexity_recovery(teacher: ChatRetention, pruned: ChatRetention, recovered: ChatRetention) -> float:
    """`(nll_pruned − nll_recovered) / (nll_pruned − nll_teacher)`: the share of the gap in nats per answer token
    that recovery closed (NaN when pruning opened none)."""
    return gap_closed(teacher.nll, pruned.nll, recovered.nll)


def gap_closed(teacher_nll: float, pruned_nll: float, nll: float) -> float:
    """`(pruned_nll − nll) / (pruned_nll − teacher_nll)`: the share of the gap in nats per token between the pruned
    model and the teacher that a model of mean NLL `nll` closed (NaN when pruning opened none)."""
    gap = pruned_nll - teacher_nll
    return (pruned_nll - nll) / gap if gap != 0 else float("nan")


def _answer(model, tokenizer, prompt_ids, max_new_tokens, batch_size, desc) -> list[list[int]]:
    with tqdm(total=len(prompt_ids), desc=desc, leave=False) as progress:
        return generate_completions(
            model, prompt_ids, stop_ids=end_of_turn_ids(model, tokenizer), pad_id=pad_id(tokenizer),
            sampling=Sampling(max_new_tokens=max_new_tokens), batch_size=batch_size, on_batch=progress.update,
        )  # fmt: skip


@torch.inference_mode()
def _score_answers(model, prompt_ids, answer_ids, tokenizer, batch_size: int) -> tuple[float, int, int]:
    """Summed NLL under `model` of the answers' tokens given their prompts (teacher-forced), how many of them are the
    model's top-1, and their number."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    rows = [(p, a) for p, a in zip(prompt_ids, answer_ids) if a]
    nll = agree = tokens = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, mask = right_padded([[*p, *a] for p, a in chunk], pad)
            labels = torch.full_like(ids, IGNORE_INDEX)
            for r, (p, a) in enumerate(chunk):
                labels[r, len(p) : len(p) + len(a)] = torch.as_tensor(a)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            targets = labels[:, 1:].to(device)  # (B, T-1): position t predicts token t + 1
            valid = targets != IGNORE_INDEX
            nll += torch.nn.functional.cross_entropy(
                logits[valid], targets[valid], reduction="sum"
            ).item()  # (N, V) against (N,)
            agree += (logits[valid].argmax(-1) == targets[valid]).sum().item()
            tokens += int(valid.sum())
    finally:
        model.train(was_training)
    return nll, agree, tokens


RATIO_FIGURES = {
    "length_ratio": "mean_length",
    "finish_ratio": "finish_rate",
    "instruction_prompt_ratio": "instruction_prompt_accuracy",
    "instruction_ratio": "instruction_accuracy",
}
"""Figures of a model's own answers read against the teacher's: `{ratio name: figure}`, the ratio being the model's
figure over the teacher's (the repeated 4-gram rate's is `ChatRetention.repetition_ratio`)."""


def chat_retention_table(scores: Mapping[str, ChatRetention]) -> dict[str, dict[str, float]]:
    """Plain figures per model (`teacher`, `pruned`, `recovered`, ...), with the log-perplexity recovery of every
    model but the teacher and the pruned one when both are there, and, with the teacher, each own-answer figure's
    ratio to the teacher's (`RATIO_FIGURES`)."""
    table = {name: score.to_dict() for name, score in scores.items()}
    if {"teacher", "pruned"} <= set(scores):
        for name, score in scores.items():
            if name not in ("teacher", "pruned"):
                table[name]["log_perplexity_recovery"] = log_perplexity_recovery(
                    scores["teacher"], scores["pruned"], score
                )
    if "teacher" in table:
        teacher = table["teacher"]
        for figures in table.values():
            for ratio, figure in RATIO_FIGURES.items():
                if figures.get(figure) is not None and teacher.get(figure):
                    figures[ratio] = figures[figure] / teacher[figure]
    return table
