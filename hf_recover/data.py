"""Recovery data: load text from anywhere (the embedded corpus, local files, the Hub), tokenize it
into fixed-length causal-LM blocks, and iterate it in batches.

A prepared dataset has three columns of equal-length lists: `input_ids`, `attention_mask` and
`labels` (`IGNORE_INDEX` where a token must not be predicted, e.g. padding). Labels are *unshifted*,
as every Hugging Face causal LM receives them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .constants import IGNORE_INDEX

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict

MODEL_INPUT_COLUMNS = ("input_ids", "attention_mask", "labels")


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
                    split, tokenizer, max_length=max_length, packing=packing, text_column=text_column,
                    num_proc=num_proc, seed=seed,
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
    a time. Only `columns` present in the data are kept; tensors are moved to `device`.
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
    return {k: torch.as_tensor([row[k] for row in rows]) for k in columns if k in rows[0]}
