"""Arguments shared by the `hf-recover` commands, and the data loaders they drive."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT = "default"


@dataclass
class DataArguments:
    dataset: list[str] = field(
        default_factory=lambda: [DEFAULT],
        metadata={
            "help": "Recovery text: 'default' (the embedded offline corpus), local .txt/.json/.jsonl/.parquet files "
            "or folders, or Hub dataset ids. Several are mixed by --dataset_weights."
        },
    )
    dataset_weights: list[float] | None = field(default=None, metadata={"help": "Mixture weights, one per dataset."})
    text_column: str = field(default="text", metadata={"help": "Column that holds the text."})
    ood_dataset: str | None = field(
        default=None,
        metadata={"help": "A held-out domain to measure generalisation (the default corpus has its own 'ood')."},
    )
    max_length: int = field(default=512, metadata={"help": "Tokens per packed training/evaluation block."})
    eval_max_length: int = field(default=512, metadata={"help": "Tokens per perplexity block."})
    eval_blocks: int = field(
        default=32, metadata={"help": "Packed blocks per split used for perplexity (32 x 512 = 16k tokens)."}
    )
    calibration_blocks: int = field(
        default=64,
        metadata={
            "help": "Packed blocks of training text used to score blocks or neurons and to fit healing maps "
            "(64 x 256 tokens heal SmolLM2's cut to 56%% recovery; 16 x 256 to 29%%)."
        },
    )
    max_train_documents: int | None = field(
        default=None, metadata={"help": "Use only this many training documents (after a seeded shuffle)."}
    )
    data_seed_value: int = field(default=0, metadata={"help": "Seed for shuffling and splitting documents."})


@dataclass
class OutputArguments:
    output_dir: str = field(default="outputs/hf-recover", metadata={"help": "Folder to write results to."})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Write into the output folder even if it is not empty (files of the same name are replaced)."
        },
    )


def command_parser(subparsers, name: str, dataclass_types: tuple, doc: str, **defaults):
    """The `HfArgumentParser` of one command: standalone, or added to the `hf-recover` subparsers.

    `--help` shows the module docstring `doc` (usage examples first) and every flag with its default.
    """
    import argparse

    from transformers import HfArgumentParser

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    summary = doc.strip().splitlines()[0].split(": ", 1)[-1].replace("%", "%%")  # argparse %-formats help
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


def load_text_splits(args: DataArguments) -> dict[str, Any]:
    """Text splits `train`, `validation` and (when known) `ood` for the data arguments."""
    from ..data import load_recovery_data
    from ..defaults import load_default_corpus

    if args.dataset == [DEFAULT] and args.dataset_weights is None:
        corpus = load_default_corpus()
        splits = {name: corpus[name] for name in ("train", "validation", "ood")}
    else:
        data = load_recovery_data(
            args.dataset, text_column=args.text_column, weights=args.dataset_weights, seed=args.data_seed_value
        )
        if len(data) < 2:
            raise ValueError("The recovery data has fewer than 2 documents: nothing to hold out for validation.")
        held_out = data.train_test_split(test_size=max(1, int(0.05 * len(data))), seed=args.data_seed_value)
        splits = {"train": held_out["train"], "validation": held_out["test"]}
    if args.ood_dataset:
        splits["ood"] = load_recovery_data(args.ood_dataset, text_column=args.text_column)
    if args.max_train_documents is not None:
        train = splits["train"].shuffle(seed=args.data_seed_value)
        splits["train"] = train.select(range(min(args.max_train_documents, len(train))))
    return splits


def prepare_eval_splits(splits: dict[str, Any], tokenizer, args: DataArguments) -> dict[str, Any]:
    """The first `eval_blocks` packed blocks of `validation` and `ood` (when present), for perplexity."""
    from ..data import prepare_recovery_dataset

    prepared = {}
    for name in ("validation", "ood"):
        if name in splits:
            data = prepare_recovery_dataset(splits[name], tokenizer, max_length=args.eval_max_length)
            prepared[name] = data.select(range(min(args.eval_blocks, len(data))))
    return prepared


def parse_prune_spec(spec: str | dict[str, Any]) -> dict[str, Any]:
    """A pruning spec as `select_candidate` takes it, from a dict, JSON, or a shorthand.

    Shorthands: `importance:6`, `angular:6`, `greedy:6`, `last:6` (depth, `n` blocks by that method),
    `remove:3,12,13` (depth, those blocks), `width:maw:0.2` (width, method and pruning ratio),
    `heads:N` / `heads:RATIO` (query heads kept per block: a count, or the fraction kept),
    `hidden:SIZE` / `hidden:RATIO` (the hidden size kept, or the fraction kept), and `+` to chain them
    (`importance:4+width:maw:0.1`, `width:maw:0.2+heads:0.5+hidden:0.75`). A depth part ending in
    `:heal=lstsq` or `:heal=cosine` heals the cuts on the calibration data (`importance:6:heal=cosine`).
    """
    if isinstance(spec, dict):
        return _check_prune_spec(spec)
    text = spec.strip()
    if text.startswith("{"):
        try:
            return _check_prune_spec(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"Prune spec {spec!r} is not valid JSON: {err}.") from err
    from ..pruning.depth import DEPTH_METHODS

    result: dict[str, Any] = {}
    for part in text.split("+"):
        part, _, heal = part.partition(":heal=")
        kind, _, rest = part.partition(":")
        if heal and kind not in (*DEPTH_METHODS, "remove"):
            raise ValueError(f"Prune spec {part!r}: ':heal=' follows a depth part (importance:6:heal=cosine).")
        if kind in DEPTH_METHODS and rest.isdigit():
            result["depth"] = {"method": kind, "n": int(rest)}
        elif kind == "remove" and rest:
            try:
                result["depth"] = {"remove": [int(i) for i in rest.split(",")]}
            except ValueError:
                raise ValueError(f"Prune spec {part!r}: 'remove:' takes comma-separated block indices.") from None
        elif kind == "width" and rest.count(":") == 1:
            method, ratio = rest.split(":")
            try:
                result.setdefault("width", {}).update(method=method, pruning_ratio=float(ratio))
            except ValueError:
                raise ValueError(f"Prune spec {part!r}: the width ratio must be a number.") from None
        elif kind in ("heads", "hidden") and rest:
            try:  # digits: a count or size; anything else: the fraction kept
                value = int(rest) if rest.isdigit() else float(rest)
            except ValueError:
                raise ValueError(f"Prune spec {part!r}: give a count or a fraction after '{kind}:'.") from None
            result.setdefault("width", {})["heads" if kind == "heads" else "hidden_size"] = value
        else:
            raise ValueError(
                f"Unknown prune spec {part!r}. Use importance:N, angular:N, greedy:N, last:N, remove:I,J,..., "
                "width:METHOD:RATIO, heads:N_OR_RATIO, hidden:SIZE_OR_RATIO, chained with '+', or a JSON dict like "
                '{"depth": {"method": "importance", "n": 6}}.'
            )
        if heal:
            from ..pruning.healing import HEAL_METHODS

            if heal not in HEAL_METHODS:
                raise ValueError(f"Prune spec {spec!r}: heal= takes one of {list(HEAL_METHODS)}, got {heal!r}.")
            result["depth"]["heal"] = heal
    return _check_prune_spec(result)


def _check_prune_spec(spec: Any) -> dict[str, Any]:
    """The spec's shape, with the keys `select_candidate` accepts (checked before any model is loaded)."""
    from ..pruning.candidates import DEPTH_SPEC_KEYS, SPEC_KEYS, WIDTH_SPEC_KEYS

    keys = {"depth": DEPTH_SPEC_KEYS, "width": WIDTH_SPEC_KEYS}
    if not isinstance(spec, dict) or not spec or set(spec) - set(SPEC_KEYS):
        raise ValueError(f"A prune spec is a dict with keys 'depth' and/or 'width'; got {spec!r}.")
    for kind, options in spec.items():
        if not isinstance(options, dict) or set(options) - set(keys[kind]):
            raise ValueError(f"Prune spec {kind!r} takes a dict with keys {sorted(keys[kind])}; got {options!r}.")
    return spec
