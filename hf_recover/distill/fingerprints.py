"""Fingerprints of what a teacher cache was built from: the teacher's weights, the tokenizer, the dataset's rows,
and the files written, so that a cache is never used with anything else (`hf_recover.distill.teacher_cache`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.data import MODEL_INPUT_COLUMNS


def key_digest(key: dict[str, Any]) -> str:
    """The name a cache entry is stored under: 24 hex digits of the sha256 of `key` as JSON (keys sorted; a value
    JSON cannot write, as its `str`). The same key always names the same entry."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes and bytes), independent of its device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """sha256 of a tokenizer's vocabulary and special tokens; `None` for no tokenizer."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def dataset_fingerprint(dataset) -> str:
    """sha256 of the model inputs of a prepared dataset (`input_ids`, `attention_mask`, `labels`), row order
    included: two datasets with the same fingerprint give the same batches."""
    import numpy as np

    digest = hashlib.sha256()
    columns = [c for c in MODEL_INPUT_COLUMNS if c in dataset.column_names]
    view = dataset.select_columns(columns).with_format("numpy")
    for start in range(0, len(dataset), 1024):
        batch = view[start : start + 1024]
        for column in columns:
            values = batch[column]
            if values.dtype == object:  # rows of different lengths (chat examples): each row with its length
                for row in values:
                    digest.update(np.int64(len(row)).tobytes() + np.ascontiguousarray(row, dtype=np.int64).tobytes())
            else:
                digest.update(np.ascontiguousarray(values, dtype=np.int64).tobytes())
    return digest.hexdigest()


def file_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    checksums = {}
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
        checksums[path.name] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return checksums
