"""Arguments shared by the `hf-recover` commands, and the data loaders they drive."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..base.constants import (
    ANSWER_TEMPERATURE,
    ANSWER_TOKENS,
    ANSWER_TOP_P,
    ANSWERS_PER_PROMPT,
    CHAT_FRACTION,
    KEPT_ANSWER_TOKENS,
    NUM_PROMPTS,
)
from ..base.data import CALIBRATION_BLOCKS, DEFAULT_CORPUS, EVAL_BLOCKS, EVAL_MAX_LENGTH, check_mixture

DEFAULT = DEFAULT_CORPUS


def model_field() -> str:
    """The dataclass field of a command's model (or teacher): 'default' or where to load it from."""
    return field(default=DEFAULT, metadata={"help": "'default' (embedded SmolLM2), a folder or a Hub id."})


@dataclass
class TextArguments:
    """Where the recovery text comes from: every command that reads text shows these."""

    dataset: list[str] = field(
        default_factory=lambda: [DEFAULT],
        metadata={
            "help": "Recovery text: 'default' (the embedded offline corpus), local .txt/.json/.jsonl/.parquet files "
            "or folders, or Hub dataset ids. Several are mixed by --dataset_weights."
        },
    )
    dataset_weights: list[float] | None = field(default=None, metadata={"help": "Mixture weights, one per dataset."})
    text_column: str = field(default="text", metadata={"help": "Column that holds the text."})
    data_seed_value: int = field(default=0, metadata={"help": "Seed for shuffling and splitting documents."})


@dataclass
class TrainingTextArguments(TextArguments):
    """The training text, packed into blocks (`cache`)."""

    max_length: int = field(default=512, metadata={"help": "Tokens per packed training (and calibration) block."})
    max_train_documents: int | None = field(
        default=None, metadata={"help": "Use only this many training documents (after a seeded shuffle)."}
    )


@dataclass
class CalibrationArguments(TrainingTextArguments):
    """The training text and its first blocks, where cuts are scored and healed (`importance`, `prune`)."""

    calibration_blocks: int = field(
        default=CALIBRATION_BLOCKS,
        metadata={
            "help": "Packed blocks of training text used to score blocks or neurons and to fit healing maps. A "
            "healing map fits hidden_size outputs from hidden_size inputs: give it many more tokens than hidden_size "
            "(64 x 512 tokens by default)."
        },
    )


@dataclass
class SelectionArguments(CalibrationArguments):
    """The calibration blocks, and the validation blocks candidates are scored on (`select`)."""

    eval_blocks: int = field(
        default=EVAL_BLOCKS,
        metadata={
            "help": "Packed blocks of validation text (each of --max_length tokens) the candidates are scored on."
        },
    )


@dataclass
class EvaluationArguments(TextArguments):
    """The splits perplexity is measured on (`evaluate`)."""

    ood_dataset: str | None = field(
        default=None,
        metadata={"help": "A held-out domain to measure generalisation (the default corpus has its own 'ood')."},
    )
    eval_max_length: int = field(default=EVAL_MAX_LENGTH, metadata={"help": "Tokens per perplexity block."})
    eval_blocks: int = field(
        default=EVAL_BLOCKS,
        metadata={"help": "Packed blocks per split used for perplexity (each of --eval_max_length tokens)."},
    )
    held_out: bool = field(
        default=True,
        metadata={
            "help": "With the default corpus, also measure perplexity on the held-out domains (git's documentation, "
            "the Jargon File): never trained on, never used to choose a recipe."
        },
    )


@dataclass
class DataArguments(EvaluationArguments, CalibrationArguments):
    """Training, calibration and evaluation text, for the commands that read all three (`recover`, `demo`,
    `compare`)."""


@dataclass
class MixtureArguments:
    """What recovery trains on beside the text: the teacher's own answers and samples (`hf-recover generate`)."""

    teacher_data: str = field(
        default="auto",
        metadata={
            "help": "The teacher's answers and samples to train on beside the text: 'auto' (written by the teacher "
            "once and cached, see --num_prompts), a folder from `hf-recover generate`, or 'none' (text only)."
        },
    )
    chat_fraction: float = field(
        default=CHAT_FRACTION,
        metadata={"help": "Share of the training tokens taken from the teacher's answers (0 to 1)."},
    )
    sample_fraction: float = field(
        default=0.0, metadata={"help": "Share of the training tokens taken from the teacher's unconditional samples."}
    )
    num_prompts: int = field(
        default=NUM_PROMPTS,
        metadata={"help": "With --teacher_data auto: prompts the teacher writes itself and answers."},
    )
    num_samples: int = field(default=0, metadata={"help": "With --teacher_data auto: unconditional samples."})
    answer_tokens: int = field(
        default=ANSWER_TOKENS, metadata={"help": "With --teacher_data auto: longest answer, in tokens."}
    )
    answer_temperature: float = field(
        default=ANSWER_TEMPERATURE,
        metadata={
            "help": "With --teacher_data auto: the teacher's answers are sampled at this temperature (0: greedy)."
        },
    )
    answer_top_p: float = field(default=ANSWER_TOP_P, metadata={"help": "With --teacher_data auto: nucleus top-p."})
    answers_per_prompt: int = field(
        default=ANSWERS_PER_PROMPT,
        metadata={"help": "With --teacher_data auto: candidate answers to each prompt (several need sampling)."},
    )
    filter_answers: bool = field(
        default=True,
        metadata={
            "help": "Train only on the teacher's answers that finish within --max_answer_tokens, do not refuse and do "
            "not loop (GOOD_ANSWERS); --no_filter_answers trains on every answer."
        },
    )
    max_answer_tokens: int | None = field(
        default=None,
        metadata={
            "help": "With --filter_answers: train only on the teacher's answers of at most this many tokens, "
            f"end-of-turn included (default: GOOD_ANSWERS' own, {KEPT_ANSWER_TOKENS})."
        },
    )
    train_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Train on this many tokens of the mixture, once (max_steps follows). Default: max_steps x batch x "
            "max_length, what text alone would have used."
        },
    )
    chat_prompts: str = field(
        default="test",
        metadata={
            "help": "Prompts to measure the assistant on: 'test' or 'dev' (hf_recover's own, never trained on), or "
            "'none'."
        },
    )
    overwrite_teacher_data: bool = field(
        default=False,
        metadata={"help": "With --teacher_data auto: build the cached teacher data again (a damaged folder)."},
    )

    def __post_init__(self):
        check_mixture(self.chat_fraction, self.sample_fraction, self.train_tokens)
        check_chat_prompts(self.chat_prompts)
        if self.overwrite_teacher_data and self.teacher_data != "auto":
            raise ValueError(
                f"--overwrite_teacher_data builds the cached teacher data (--teacher_data auto) again; --teacher_data "
                f"is {self.teacher_data!r}. Rebuild a folder of yours with `hf-recover generate --overwrite`."
            )
        from ..base.generation import Sampling

        try:  # the answers' sampling, checked before anything is loaded
            sampling = Sampling(self.answer_temperature, self.answer_top_p, self.answer_tokens)
        except ValueError as error:
            raise ValueError(f"--answer_temperature / --answer_top_p / --answer_tokens: {error}") from error
        if self.max_answer_tokens is not None and not self.filter_answers:
            raise ValueError(
                f"--max_answer_tokens {self.max_answer_tokens} caps the answers --filter_answers keeps, and "
                "--no_filter_answers reads every answer: drop one of the two."
            )
        try:
            self.answer_filter()
        except ValueError as error:
            raise ValueError(f"--max_answer_tokens: {error}") from error
        if isinstance(self.answers_per_prompt, bool) or self.answers_per_prompt < 1:
            raise ValueError(f"--answers_per_prompt must be an int >= 1, got {self.answers_per_prompt!r}.")
        if self.answers_per_prompt > 1 and sampling.greedy:
            raise ValueError(
                f"--answers_per_prompt {self.answers_per_prompt} with greedy answers (--answer_temperature 0) writes "
                "the same answer each time: set --answers_per_prompt 1, or sample (--answer_temperature > 0)."
            )

    def teacher_data_settings(self) -> dict[str, Any]:
        """`teacher_mixture`'s keyword arguments for how the teacher data is written and read."""
        from ..base.generation import Sampling

        return {
            "teacher_data": self.teacher_data, "chat_fraction": self.chat_fraction,
            "sample_fraction": self.sample_fraction, "num_prompts": self.num_prompts, "num_samples": self.num_samples,
            "answer_tokens": self.answer_tokens, "answers_per_prompt": self.answers_per_prompt,
            "answer_sampling": Sampling(self.answer_temperature, self.answer_top_p, self.answer_tokens),
            "answer_filter": self.answer_filter(),
        }  # fmt: skip

    def answer_filter(self):
        """The `AnswerFilter` these flags ask for: `GOOD_ANSWERS` (capped at `--max_answer_tokens` where given), or
        `KEEP_ALL_ANSWERS` with `--no_filter_answers`."""
        from ..distill.answer_filter import GOOD_ANSWERS, KEEP_ALL_ANSWERS

        if not self.filter_answers:
            return KEEP_ALL_ANSWERS
        if self.max_answer_tokens is None:
            return GOOD_ANSWERS
        return replace(GOOD_ANSWERS, max_answer_tokens=self.max_answer_tokens)

    @property
    def uses_teacher_data(self) -> bool:
        return self.teacher_data != "none" and self.chat_fraction + self.sample_fraction > 0


def check_chat_prompts(value: str) -> None:
    """`--chat_prompts` names one of hf_recover's own prompt sets, or `none`: anything else (a file) is refused
    before any work."""
    from ..base.chat_retention import PROMPT_SETS

    if value not in (*PROMPT_SETS, "none"):
        raise ValueError(
            f"--chat_prompts takes {', '.join(PROMPT_SETS)} (hf_recover's own prompt sets) or none, got {value!r}: "
            "files of prompts are not read here. Choose one of those; to measure on your own prompts, call "
            "hf_recover.evaluate_chat_retention(model, tokenizer, teacher=teacher, prompts=prompts)."
        )


@dataclass
class OutputArguments:
    output_dir: str = field(default="outputs/hf-recover", metadata={"help": "Folder to write results to."})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Write into the output folder even if it is not empty (files of the same name are replaced)."
        },
    )


def command_parser(subparsers, name: str, dataclass_types: tuple, doc: str, *, takes_prune_specs=False, **defaults):
    """The `HfArgumentParser` of one command: standalone, or added to the `hf-recover` subparsers.

    `--help` shows the module docstring `doc` (usage examples first), the prune-spec grammar when the command
    `takes_prune_specs`, and every flag with its default.
    """
    import argparse

    from transformers import HfArgumentParser

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    summary = doc.strip().splitlines()[0].split(": ", 1)[-1].replace("%", "%%")  # argparse %-formats help
    if takes_prune_specs:
        from ..prune.spec import PRUNE_SPEC_GRAMMAR

        doc = doc.rstrip() + "\n\n" + PRUNE_SPEC_GRAMMAR + "\n"
    kwargs = {"description": doc, "formatter_class": Formatter}
    if subparsers is None:
        parser = HfArgumentParser(dataclass_types, prog=f"hf-recover {name}", **kwargs)
    else:
        parser = subparsers.add_parser(name, dataclass_types=dataclass_types, help=summary, **kwargs)
    parser.set_defaults(**defaults)
    return parser


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to write into a non-empty folder unless `overwrite` is set (before any work is done)."""
    path = Path(path)
    if path.is_file():
        raise ValueError(f"Output {path} is a file; give a folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"Output folder {path} already exists and is not empty; pass --overwrite to replace it.")
    return path


def load_text_splits(args: TextArguments) -> dict[str, Any]:
    """`hf_recover.base.data.load_text_splits` for a command's text arguments: `ood` and the held-out domains only
    for a command that evaluates on them, the training documents cut only for one that trains on them."""
    from ..base.data import load_text_splits as load_splits

    return load_splits(
        args.dataset, weights=args.dataset_weights, text_column=args.text_column,
        ood_dataset=getattr(args, "ood_dataset", None), held_out=getattr(args, "held_out", False),
        max_train_documents=getattr(args, "max_train_documents", None), seed=args.data_seed_value,
    )  # fmt: skip


def prepare_eval_splits(splits: dict[str, Any], tokenizer, args: EvaluationArguments) -> dict[str, Any]:
    """`hf_recover.base.data.prepare_eval_splits` for the data arguments."""
    from ..base.data import prepare_eval_splits as prepare

    return prepare(splits, tokenizer, max_length=args.eval_max_length, blocks=args.eval_blocks)
