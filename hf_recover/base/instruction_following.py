"""Does the model follow instructions a program can check? Prompts with verifiable instructions, scored by IFEval's
verifiers.

IFEval (Zhou et al., "Instruction-Following Evaluation for Large Language Models", 2023) pairs everyday requests with
instructions whose following a rule decides: "wrap the title in double angular brackets", "end with a P.S.", "no
commas", "at least 50 words". A pruned assistant that loops, never stops or refuses fails them whatever its
perplexity. hf_recover ships its own prompts in that style (`load_instruction_prompts`: `dev` for choosing recipes,
`test` for reporting, written by hand for hf_recover and never trained on) and scores answers with the verifiers that
lm-evaluation-harness maintains (`lm_eval.tasks.ifeval`, the `hf-recover[eval]` extra), so the figures mean what
IFEval's mean:

- **prompt-level accuracy**: the share of prompts whose every instruction is followed;
- **instruction-level accuracy**: the share of all instructions followed;
- *strict* scores the answer as it is; *loose* also accepts it without its first or last line or without `*`
  markup (IFEval's upper bound).

Two of IFEval's instruction types (sentence counts, capital-word frequency) need NLTK's data (Punkt, a word
tokenizer), which hf_recover cannot count on being downloadable offline: its prompts use neither, and
`check_instruction_prompts` refuses them.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import SimpleNamespace
from typing import Any

INSTRUCTION_PROMPTS_FILE = "instruction_prompts.json"
PROMPT_SETS = ("dev", "test")
UNSUPPORTED_INSTRUCTIONS = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
"""IFEval instruction types whose verifiers need NLTK's data (not downloadable offline)."""
EXTRA_HINT = "pip install 'hf-recover[eval]' (lm-eval with its ifeval extra: langdetect, immutabledict, nltk)"


@dataclass(frozen=True)
class InstructionFollowing:
    """IFEval's four accuracies of a set of answers (see the module docstring)."""

    prompts: int
    instructions: int
    prompt_accuracy: float
    instruction_accuracy: float
    loose_prompt_accuracy: float
    loose_instruction_accuracy: float


def load_instruction_prompts(split: str = "test") -> list[dict[str, Any]]:
    """hf_recover's own prompts with verifiable instructions, in IFEval's format (`key`, `prompt`,
    `instruction_id_list`, `kwargs`): `"dev"` (for choosing recipes) or `"test"` (for reporting them)."""
    if split not in PROMPT_SETS:
        raise ValueError(f"split must be one of {list(PROMPT_SETS)}, got {split!r}.")
    text = resources.files("hf_recover.base.defaults").joinpath(INSTRUCTION_PROMPTS_FILE).read_text(encoding="utf-8")
    return [dict(item) for item in json.loads(text)[split]]


def verifiers_available() -> bool:
    """Whether IFEval's verifiers (lm-eval's `ifeval` task and its dependencies) can be imported."""
    try:
        _verifiers()
    except ImportError:
        return False
    return True


def check_instruction_prompts(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The items as plain dicts, each checked to be an IFEval item whose instruction ids the verifiers know and whose
    keyword arguments they accept: a clear `ValueError` names the first that is not, before any answer is written."""
    if isinstance(items, (str, Mapping)):
        raise TypeError(f"Instruction prompts must be a list of IFEval items, got one {type(items).__name__}.")
    registry = _verifiers().instructions_registry.INSTRUCTION_DICT
    checked = []
    for index, item in enumerate(items):
        missing = {"prompt", "instruction_id_list", "kwargs"} - set(item)
        if missing:
            raise ValueError(f"Instruction prompt {index} lacks {sorted(missing)}: give IFEval's fields.")
        ids, kwargs = list(item["instruction_id_list"]), list(item["kwargs"])
        if not ids or len(ids) != len(kwargs):
            raise ValueError(
                f"Instruction prompt {index} needs one kwargs dict per instruction id, got {len(ids)} ids and "
                f"{len(kwargs)} kwargs."
            )
        for instruction_id, arguments in zip(ids, kwargs):
            if instruction_id in UNSUPPORTED_INSTRUCTIONS:
                raise ValueError(
                    f"{instruction_id!r} (prompt {index}) needs NLTK's data, which may not be downloadable: choose "
                    "another type."
                )
            if instruction_id not in registry:
                raise ValueError(f"Unknown IFEval instruction {instruction_id!r} in prompt {index}.")
            try:
                registry[instruction_id](instruction_id).build_description(**_given(arguments))
            except TypeError as error:
                raise ValueError(f"Instruction {instruction_id!r} of prompt {index}: {error}") from error
        checked.append({"key": item.get("key", index), **{k: item[k] for k in ("prompt", "instruction_id_list")}})
        checked[-1]["kwargs"] = [dict(arguments) for arguments in kwargs]
    return checked


def follows_instructions(item: Mapping[str, Any], response: str) -> dict[str, Any]:
    """IFEval's verdicts on one answer: `prompt_level_strict_acc` (bool), `inst_level_strict_acc` (one bool per
    instruction) and their `loose` twins, as lm-eval's `ifeval` task computes them."""
    return _verifiers().utils.process_results(dict(item), [response])


def score_instruction_following(items: Sequence[Mapping[str, Any]], responses: Sequence[str]):
    """The `InstructionFollowing` of `responses` (one answer text per item, in order)."""
    if len(items) != len(responses):
        raise ValueError(f"Got {len(items)} instruction prompts but {len(responses)} answers: give one per prompt.")
    if not items:
        raise ValueError("No instruction prompts to score.")
    verdicts = [follows_instructions(item, response) for item, response in zip(items, responses)]
    strict = [flag for v in verdicts for flag in v["inst_level_strict_acc"]]
    loose = [flag for v in verdicts for flag in v["inst_level_loose_acc"]]
    return InstructionFollowing(
        prompts=len(items),
        instructions=len(strict),
        prompt_accuracy=sum(v["prompt_level_strict_acc"] for v in verdicts) / len(items),
        instruction_accuracy=sum(strict) / len(strict),
        loose_prompt_accuracy=sum(v["prompt_level_loose_acc"] for v in verdicts) / len(items),
        loose_instruction_accuracy=sum(loose) / len(loose),
    )


def _given(arguments: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in arguments.items() if value is not None}


@cache
def _verifiers():
    """lm-eval's IFEval modules. Importing them tries to download NLTK's Punkt data and prints the failure; that
    noise is swallowed (none of hf_recover's instruction types needs the data). langdetect is seeded, so the language
    and case checks give the same verdict on every run."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from langdetect import DetectorFactory
            from lm_eval.tasks.ifeval import instructions_registry, utils
    except ImportError as error:
        raise ImportError(f"Instruction following is scored by IFEval's verifiers (lm-eval): {EXTRA_HINT}.") from error
    DetectorFactory.seed = 0  # the language checks run langdetect, which is random unless seeded
    return SimpleNamespace(instructions_registry=instructions_registry, utils=utils)
