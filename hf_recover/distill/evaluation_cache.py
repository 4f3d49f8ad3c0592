"""Perplexities that do not change between runs of the same protocol, computed once.

The teacher's and the cut's perplexity on each evaluation split, and the healed start's when its heal is the same,
are the same in every run of a protocol: recomputing them is a fixed cost paid every time. `cached_perplexity`
keys a perplexity by what decides it (the model's weights, the split's exact tokens, the batch settings, the
type it computes in, torch's and hf_recover's versions) and reads it back from hf_recover's cache (`cache_root`) on the
next run. A model whose weights changed (a recovered student) simply misses.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..base.defaults.assets import cache_root
from ..base.evaluation import evaluate_perplexity
from ..base.evaluation import evaluate_splits as evaluate_splits_uncached
from ..base.precision import compute_dtype
from ..base.version import __version__
from .fingerprints import dataset_fingerprint, key_digest, weights_fingerprint

FOLDER = "perplexity"


def cached_perplexity(
    model: torch.nn.Module,
    data: Any,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    desc: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    model_key: str | None = None,
    data_key: str | None = None,
) -> tuple[float, bool]:
    """`evaluate_perplexity(model, data, ...)["perplexity"]`, read from the cache when this model (its class,
    configuration and weights) was measured on these tokens with these settings before; returns
    `(perplexity, read_from_cache)`. `model_key` / `data_key` (from `model_fingerprint` / `dataset_fingerprint`)
    spare recomputing them when one model meets several splits."""
    parameter = next(model.parameters())
    key = {
        "model": model_key or model_fingerprint(model),
        "data": data_key or dataset_fingerprint(data),
        "batch_size": batch_size,
        "max_batches": max_batches,
        "dtype": str(compute_dtype(parameter)),  # the autocast type under --bf16
        "device": parameter.device.type,
        "torch": torch.__version__,
        "hf_recover": __version__,
    }
    path = Path(cache_root(cache_dir)) / FOLDER / f"{key_digest(key)}.json"
    if path.is_file():
        try:
            return float(json.loads(path.read_text(encoding="utf-8"))["perplexity"]), True
        except (ValueError, KeyError, TypeError):  # a damaged entry is measured again and replaced
            pass
    perplexity = evaluate_perplexity(model, data, batch_size=batch_size, max_batches=max_batches, desc=desc)[
        "perplexity"
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps({**key, "perplexity": perplexity}, sort_keys=True), encoding="utf-8")
    partial.replace(path)  # whole or absent
    return perplexity, False


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of what decides a model's outputs: its class, its configuration (rotary settings and the attention
    implementation live there, not in the weights) and its weights."""
    config = getattr(model, "config", None)
    settings = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else ""
    described = f"{type(model).__qualname__}|{getattr(config, '_attn_implementation', None)}|{settings}|"
    return hashlib.sha256((described + weights_fingerprint(model)).encode()).hexdigest()


def evaluate_splits(
    models: dict[str, torch.nn.Module],
    splits: dict[str, Any],
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    cache: bool = False,
) -> dict[str, dict[str, float]]:
    """Perplexity of every model on every prepared split: `{split: {model_name: ppl}}`
    (`hf_recover.base.evaluation.evaluate_splits`). With `cache`, a model measured on a split before (the same
    weights, tokens and settings: the teacher, the cut, the same heal) is read from hf_recover's cache instead, and the
    line printed says so."""
    if not cache:
        return evaluate_splits_uncached(models, splits, batch_size=batch_size, max_batches=max_batches)
    figures: dict[str, dict[str, float]] = {split: {} for split in splits}
    data_keys = {split: dataset_fingerprint(data) for split, data in splits.items()}
    for name, model in models.items():
        read, model_key = [], model_fingerprint(model)
        for split, data in splits.items():
            figures[split][name], hit = cached_perplexity(
                model, data, batch_size=batch_size, max_batches=max_batches, desc=f"{name}/{split}",
                model_key=model_key, data_key=data_keys[split],
            )  # fmt: skip
            read += [split] if hit else []
        if read:
            print(f"{name}: perplexity on {', '.join(read)} read from the cache (measured in an earlier run)")
    return figures
