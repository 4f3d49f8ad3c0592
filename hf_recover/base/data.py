"""Recovery data: load text from anywhere (the embedded corpus, local files, the Hub), tokenize it
into fixed-length causal-LM blocks, and iterate it in batches.

A prepared dataset has three columns of equal-length lists: `input_ids`, `attention_mask` and
`labels` (`IGNORE_INDEX` where a token must not be predicted, e.g. padding). Labels are *unshifted*,
as every Hugging Face causal LM receives them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .constants import IGNORE_INDEX

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict

MODEL_INPUT_COLUMNS = ("input_ids", "attention_mask", "labels")


LOCAL_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_recovery_data(
    name_or_path: str | os.PathLike | Sequence[str | os.PathLike | Mapping[str, Any]],
    *,
    text_column: str = "text",
    split: str = "train",
    weights: Sequence[float] | None = None,
    subset: str | None = None,
    seed: int = 0,
    max_documents: int | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """Load recovery text as a `Dataset` with a `text` column (and `source`), from anywhere.

    `name_or_path` is one source or a list of sources. A source is:
    - `"default"`: the embedded offline corpus (`split` picks `train`, `validation` or `ood`);
    - a local `.txt` (one document per file), `.json`/`.jsonl` or `.parquet` file, or a folder of them;
    - a Hub dataset id (`subset` is its config name), used when the Hub is reachable;
    - a dict `{"path": ..., "text_column": ..., "subset": ..., "split": ...}` overriding those per source.
    Several sources are mixed by `datasets.interleave_datasets` with probabilities `weights` (equal by
    default, e.g. equal parts of four Cosmopedia subsets) until the first one runs out.
    `max_documents` keeps the first documents after a shuffle with `seed`.
    """
    from datasets import interleave_datasets

    specs = [name_or_path] if isinstance(name_or_path, str | os.PathLike | Mapping) else list(name_or_path)
    if not specs:
        raise ValueError("name_or_path is an empty list: give at least one dataset id, file or folder.")
    if weights is not None:
        if len(weights) != len(specs):
            raise ValueError(f"Got {len(weights)} weights for {len(specs)} sources; give one weight per source.")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 and not all zero, got {list(weights)}.")
    sources = [_source_spec(spec, text_column=text_column, split=split, subset=subset) for spec in specs]
    for source in sources:  # fail on a missing file before loading anything
        _check_source_exists(source)
    datasets = [_load_source(source, **load_kwargs) for source in sources]
    if len(datasets) == 1:
        dataset = datasets[0]
    else:
        probabilities = [w / sum(weights) for w in weights] if weights is not None else None
        dataset = interleave_datasets(datasets, probabilities=probabilities, seed=seed)
    if len(dataset) == 0:
        raise ValueError(f"The recovery data from {specs} is empty.")
    if max_documents is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(max_documents, len(dataset))))
    return dataset


def _source_spec(spec, *, text_column: str, split: str, subset: str | None) -> dict[str, Any]:
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"path", "text_column", "subset", "split"}
        if "path" not in spec or unknown:
            raise ValueError(
                f"A source dict needs 'path' and may have 'text_column', 'subset', 'split'; got keys {sorted(spec)}."
            )
        return {"text_column": text_column, "split": split, "subset": subset, **spec, "path": str(spec["path"])}
    return {"path": str(spec), "text_column": text_column, "split": split, "subset": subset}


def _is_local(path: str) -> bool:
    return Path(path).exists() or path.startswith((".", "/", "~")) or Path(path).suffix in LOCAL_FORMATS


def _check_source_exists(source: dict[str, Any]) -> None:
    path = source["path"]
    if path != "default" and _is_local(path) and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"No such file or folder: {path}.")


def _load_source(source: dict[str, Any], **load_kwargs: Any) -> Dataset:
    from datasets import load_dataset

    path, column = source["path"], source["text_column"]
    if path == "default":
        from .defaults import load_default_corpus

        dataset = load_default_corpus()[source["split"]]
    elif _is_local(path):
        dataset = load_local_files(path, **load_kwargs)
    else:
        try:
            dataset = load_dataset(path, source["subset"], split=source["split"], **load_kwargs)
        except (ConnectionError, OSError) as err:
            raise OSError(
                f"Could not load the Hub dataset {path!r} ({err}). Without the Hub, pass local .txt/.json/.jsonl/"
                ".parquet files or 'default' (the embedded offline corpus)."
            ) from err
    _check_text_dataset(dataset, column, f"source {path!r}")
    dataset = dataset.select_columns([column])
    if column != "text":
        dataset = dataset.rename_column(column, "text")
    return dataset.add_column("source", [path] * len(dataset))


def load_local_files(path: str | os.PathLike, **load_kwargs: Any) -> Dataset:
    """A local `.txt` (one document per file), `.json`/`.jsonl` or `.parquet` file, or a folder of them, as a
    `Dataset` with all its columns."""
    from datasets import load_dataset

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"No such file or folder: {path}.")
    files = _local_files(path)
    builder = LOCAL_FORMATS[files[0].suffix]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    return load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs, **load_kwargs)


def _local_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS)
    if not files:
        raise FileNotFoundError(f"{path} holds no {'/'.join(LOCAL_FORMATS)} file.")
    unsupported = [f for f in files if f.suffix not in LOCAL_FORMATS]
    if unsupported:
        raise ValueError(f"Unsupported file type {unsupported[0].suffix!r}; use one of {sorted(LOCAL_FORMATS)}.")
    formats = {LOCAL_FORMATS[f.suffix] for f in files}
    if len(formats) > 1:
        raise ValueError(f"{path} mixes file formats {sorted(formats)}; give each format as its own source.")
    return files


def prepare_recovery_dataset(
    dataset: Dataset | DatasetDict,
    tokenizer,
    *,
    max_length: int = 512,
    packing: bool = True,
    text_column: str = "text",
    num_proc: int | None = None,
    seed: int | None = None,
) -> Dataset | DatasetDict:
    """Tokenize `dataset[text_column]` into blocks of `max_length` tokens for causal-LM recovery.

    With `packing`, documents are concatenated with the tokenizer's EOS after each one and cut into
    full blocks (the tail shorter than a block is dropped, as `run_clm.py` does), so every label is
    valid. Without it, each document becomes one row, truncated to `max_length` and right-padded,
    with `attention_mask = 0` and `labels = -100` on the padding.
    `seed`, when given, shuffles documents (deterministically) before packing.
    A `DatasetDict` is prepared split by split.
    """
    from datasets import DatasetDict

    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one input and one next-token label), got {max_length}.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token; set tokenizer.eos_token before preparing recovery data.")
    if isinstance(dataset, DatasetDict):
        for name, split in dataset.items():
            _check_text_dataset(split, text_column, f"split {name!r}")
        return DatasetDict(
            {
                name: prepare_recovery_dataset(
                    split,
                    tokenizer,
                    max_length=max_length,
                    packing=packing,
                    text_column=text_column,
                    num_proc=num_proc,
                    seed=seed,
                )
                for name, split in dataset.items()
            }
        )
    _check_text_dataset(dataset, text_column, "dataset")
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    tokenized = dataset.map(
        tokenize, batched=True, num_proc=num_proc, remove_columns=dataset.column_names, desc="Tokenizing"
    )

    if packing:

        def pack(batch):
            stream = [token for doc in batch["input_ids"] for token in doc]
            n_blocks = len(stream) // max_length
            blocks = [stream[i * max_length : (i + 1) * max_length] for i in range(n_blocks)]
            return {"input_ids": blocks, "attention_mask": [[1] * max_length for _ in blocks], "labels": blocks}

        result = tokenized.map(pack, batched=True, batch_size=1000, num_proc=num_proc, desc="Packing")
        if len(result) == 0:
            raise ValueError(
                f"Packing produced no block: the dataset holds fewer than max_length={max_length} tokens. "
                "Give more text or a smaller max_length."
            )
        return result

    def pad_rows(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for doc in batch["input_ids"]:
            doc = doc[:max_length]
            n_pad = max_length - len(doc)
            out["input_ids"].append(doc + [pad] * n_pad)
            out["attention_mask"].append([1] * len(doc) + [0] * n_pad)
            out["labels"].append(doc + [IGNORE_INDEX] * n_pad)
        return out

    return tokenized.map(pad_rows, batched=True, num_proc=num_proc, desc="Padding")


def _check_text_dataset(dataset, text_column: str, what: str) -> None:
    if text_column not in dataset.column_names:
        raise ValueError(
            f"{what} has no column {text_column!r}; its columns are {dataset.column_names}. "
            "Pass text_column= with the name of the column that holds the text."
        )
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty: there is no text to prepare.")


def iter_batches(
    data: Any,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    columns: Iterable[str] = MODEL_INPUT_COLUMNS,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches of tensors from a prepared `Dataset`, a list of rows, or a `DataLoader`.

    A `DataLoader` (any iterable of dict batches) is used as it is; rows are stacked `batch_size` at
    a time, rows of different lengths (chat examples) padded on the right to the batch's longest, the padding
    masked (`attention_mask` 0, `labels` `IGNORE_INDEX`). Only `columns` present in the data are kept; tensors are
    moved to `device`.
    """
    import torch

    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}.")
    columns = tuple(columns)
    if _is_row_sequence(data):
        if len(data) == 0:
            raise ValueError("The evaluation data is empty.")
        batches = (
            _stack_rows([data[j] for j in range(i, min(i + batch_size, len(data)))], columns)
            for i in range(0, len(data), batch_size)
        )
    else:
        batches = ({k: torch.as_tensor(v) for k, v in batch.items() if k in columns} for batch in data)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        yield {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def num_batches(data: Any, *, batch_size: int = 8, max_batches: int | None = None) -> int | None:
    """How many batches `iter_batches` yields, when it can be known up front (for progress bars)."""
    try:
        n = -(-len(data) // batch_size) if _is_row_sequence(data) else len(data)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def _is_row_sequence(data: Any) -> bool:
    from datasets import Dataset

    return isinstance(data, Dataset) or (isinstance(data, list | tuple) and (not data or isinstance(data[0], Mapping)))


def _stack_rows(rows: list[Mapping[str, Any]], columns: tuple[str, ...]) -> dict[str, torch.Tensor]:
    import torch

    if "input_ids" not in rows[0]:
        raise ValueError(
            f"Rows have columns {sorted(rows[0])} but no 'input_ids': prepare the data with "
            "hf_recover.prepare_recovery_dataset first."
        )
    lengths = [len(row["input_ids"]) for row in rows]
    width = max(lengths)
    if min(lengths) == width:
        return {k: torch.as_tensor([row[k] for row in rows]) for k in columns if k in rows[0]}
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}  # masked: the id padded in never counts
    masks = [row.get("attention_mask", [1] * n) for row, n in zip(rows, lengths)]
    padded = {"attention_mask": [list(m) + [0] * (width - n) for m, n in zip(masks, lengths)]}
    for k in columns:
        if k in rows[0] and k != "attention_mask":
            padded[k] = [list(row[k]) + [fill.get(k, 0)] * (width - n) for row, n in zip(rows, lengths)]
    return {k: torch.as_tensor(v) for k, v in padded.items() if k in columns}


def pad_rows(dataset: Dataset, pad_id: int) -> Dataset:
    """Rows of different lengths padded on the right to the longest: `input_ids` with `pad_id`, `attention_mask`
    with 0, `labels` with `IGNORE_INDEX` (nothing padded is trained on). Rows of one length come back as they are."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    width = max(lengths)
    if min(lengths) == width:
        return dataset

    def pad(row):
        extra = width - len(row["input_ids"])
        return {
            "input_ids": row["input_ids"] + [pad_id] * extra,
            "attention_mask": row["attention_mask"] + [0] * extra,
            "labels": row["labels"] + [IGNORE_INDEX] * extra,
        }

    return dataset.map(pad, desc="Padding rows")


DEFAULT_CORPUS = "default"
"""The name of the embedded offline corpus (`hf_recover.load_default_corpus`) among the recovery text sources."""
CALIBRATION_BLOCKS = 64
"""Packed blocks of training text that cuts are scored and healed on, by default (64 x 512 tokens: many more tokens
than the hidden size, as a least-squares healing map of `hidden_size` x `hidden_size` needs)."""
EVAL_BLOCKS = 32
"""Packed blocks per split that perplexity is measured on, by default."""
EVAL_MAX_LENGTH = 512
"""Tokens per perplexity block, by default."""


def load_text_splits(
    dataset: Sequence[str] = (DEFAULT_CORPUS,),
    *,
    weights: Sequence[float] | None = None,
    text_column: str = "text",
    ood_dataset: str | None = None,
    held_out: bool = True,
    max_train_documents: int | None = None,
    seed: int = 0,
) -> dict[str, Dataset]:
    """Text splits `train`, `validation` and (when known) `ood` of the recovery text `dataset` (`"default"`: the
    embedded corpus, with its own `ood`; else sources of `load_recovery_data`, mixed by `weights`, 5% held out for
    validation). `ood_dataset` adds (or replaces) `ood`; `held_out` adds the held-out domains of the default corpus
    (`load_held_out_corpus`); `max_train_documents` keeps that many training documents after a shuffle by `seed`."""
    default = list(dataset) == [DEFAULT_CORPUS]
    if default and weights is None:
        from .defaults import load_default_corpus

        corpus = load_default_corpus()
        splits = {name: corpus[name] for name in ("train", "validation", "ood")}
    else:
        data = load_recovery_data(list(dataset), text_column=text_column, weights=weights, seed=seed)
        if len(data) < 2:
            raise ValueError("The recovery data has fewer than 2 documents: nothing to hold out for validation.")
        split = data.train_test_split(test_size=max(1, int(0.05 * len(data))), seed=seed)
        splits = {"train": split["train"], "validation": split["test"]}
    if ood_dataset:
        splits["ood"] = load_recovery_data(ood_dataset, text_column=text_column)
    if held_out and default:
        from .defaults import load_held_out_corpus

        splits.update(load_held_out_corpus())
    if max_train_documents is not None:
        train = splits["train"].shuffle(seed=seed)
        splits["train"] = train.select(range(min(max_train_documents, len(train))))
    return splits


def first_blocks(data: Dataset, count: int) -> Dataset:
    """The first `count` rows of a prepared dataset, or all of them when it holds fewer: the calibration blocks that
    cuts are scored and healed on, the blocks perplexity is measured on."""
    return data.select(range(min(count, len(data))))


def prepare_eval_splits(
    splits: Mapping[str, Dataset], tokenizer, *, max_length: int = EVAL_MAX_LENGTH, blocks: int = EVAL_BLOCKS
) -> dict[str, Dataset]:
    """The first `blocks` packed blocks of `max_length` tokens of every split but `train` (`validation`, `ood`, the
    held-out domains), for perplexity."""
    return {
        name: first_blocks(prepare_recovery_dataset(split, tokenizer, max_length=max_length), blocks)
        for name, split in splits.items()
        if name != "train"
    }


def check_mixture(chat_fraction: float, sample_fraction: float, train_tokens: int | None = None) -> None:
    """The checks of a mixture's settings that `teacher_mixture` and `hf-recover recover` share: each fraction in
    [0, 1], some room left for text, and a positive token budget (None: the caller's default)."""
    for name, value in (("chat_fraction", chat_fraction), ("sample_fraction", sample_fraction)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(
                f"{name} (--{name}) is a share of the training tokens and must lie in [0, 1], got {value!r}."
            )
    if chat_fraction + sample_fraction > 1:
        raise ValueError(
            f"chat_fraction + sample_fraction (--chat_fraction, --sample_fraction) together are "
            f"{chat_fraction + sample_fraction:g}, over 1: leave some room for text."
        )
    if train_tokens is not None and (
        isinstance(train_tokens, bool) or not isinstance(train_tokens, int) or train_tokens < 1
    ):
        raise ValueError(
            f"train_tokens (--train_tokens) is the mixture's size in tokens and must be an int >= 1, got "
            f"{train_tokens!r}; leave it unset for the default budget (max_steps x batch x max_length)."
        )


def mix_recovery_datasets(datasets: Mapping[str, Dataset], tokens: Mapping[str, int], *, seed: int = 0) -> Dataset:
    """About `tokens[name]` tokens of each prepared dataset (its first rows after a seeded shuffle, until the count is
    reached), shuffled together: a training mixture measured in the tokens it trains on.

    Every dataset is brought to the columns of a chat dataset (`hf_recover.base.chat.CHAT_COLUMNS`): a prose block
    gets `prompt_length` 0 (nothing of it is a prompt). Rows of different lengths are batched with a padding
    collator. Asking a dataset for more tokens than it holds is an error.
    """
    from datasets import concatenate_datasets

    from .chat import CHAT_COLUMNS

    parts = []
    for name, wanted in tokens.items():
        if wanted <= 0:
            continue
        data = datasets[name].shuffle(seed=seed)
        lengths = [sum(mask) for mask in data["attention_mask"]]
        if sum(lengths) < wanted:
            raise ValueError(f"{name} holds {sum(lengths):,} tokens; the mixture asks for {wanted:,}.")
        count, total = 0, 0
        while total < wanted:
            total += lengths[count]
            count += 1
        part = data.select(range(count))
        if "prompt_length" not in part.column_names:
            part = part.add_column("prompt_length", [0] * count)
        parts.append(part.select_columns(list(CHAT_COLUMNS)).cast(_chat_features()))
    if not parts:
        raise ValueError("The mixture has no rows: ask for some tokens of at least one dataset.")
    return concatenate_datasets(parts).shuffle(seed=seed)


def _chat_features():
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "attention_mask": List(Value("int8")),
            "labels": List(Value("int32")),
            "prompt_length": Value("int32"),
        }
    )
