"""Depth pruning: remove whole transformer blocks and fix every per-layer setting that indexes them."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..base.anatomy import PER_LAYER_CONFIG_FIELDS, check_supported, decoder_layers
from ..base.pruned_config import PrunedConfig
from ..base.renamed import REMOVED_IN
from .greedy import greedy_block_removal
from .healing import HealSpec, check_heal, heal_cuts, teacher_targets
from .importance import _block_scores, check_layer_indices
from .record import base_pruned_config, describe_data, finish_pruning

DEPTH_METHODS = ("importance", "angular", "greedy", "last")
SCORE_FOR_METHOD = {"importance": "block_influence", "angular": "angular"}


def prune_depth(
    model: nn.Module,
    *,
    remove: list[int] | None = None,
    n: int | None = None,
    method: str = "importance",
    scores: torch.Tensor | list[float] | None = None,
    data: Any = None,
    inplace: bool = False,
    batch_size: int = 8,
    max_batches: int | None = None,
    heal: str | dict | HealSpec | None = None,
    heal_sequential: bool | None = None,
) -> tuple[nn.Module, PrunedConfig]:
    """Remove transformer blocks; return the pruned model and its `PrunedConfig` (also `model.pruned_config`).

    Either name the blocks, `remove=[3, 12, ...]`, or let `method` choose `n` of them:
    - `"importance"`: the `n` blocks of lowest block influence (ShortGPT), scored on `data`;
    - `"angular"`: the `n` contiguous blocks whose input and output are closest in angular distance
      (Gromov et al.), scored on `data`;
    - `"greedy"`: one block at a time, each time the one whose removal changes the next-token distribution least
      (forward KL to `model` on `data`), re-scored after every removal (`hf_recover.prune.greedy`): it sees how
      removals interact, at `n × blocks` forwards of `data` (bound them with `max_batches`);
    - `"last"`: the last `n` blocks (the naive baseline).
    `scores` from `block_importance` (with `n_blocks=n` for `"angular"`) replace `data`.

    The result is a normal model of the same class: `num_hidden_layers`, `layer_types` (sliced),
    Qwen's `max_window_layers` and each block's `layer_idx` (the KV cache indexes by it) are fixed, so
    `forward`, `generate` with the cache, and `save_pretrained` -> `AutoModelForCausalLM.from_pretrained`
    all work. `inplace=False` (the default) leaves `model` untouched and prunes a deep copy. A model
    that was pruned before (it carries a `pruned_config`) gets one config describing both prunings.

    `heal="lstsq"` or `"cosine"` (or a `HealSpec`) heals each cut without training (see `hf_recover.prune.healing`):
    for every contiguous run of removed blocks, a linear map fitted on `data` (padding excluded) is folded
    into the `down_proj` of the block before the run, so that block's output approximates the output of
    the run's last removed block. No parameter is added. `heal="local"` fits that map, then trains the block
    before the run alone to reproduce the teacher's hidden state after the run (block-local distillation on
    `data`, `hf_recover.prune.local_healing`; `HealSpec` sets its steps and learning rate).
    `HealSpec(sequential=True)` (the default) fits the maps one cut after another on the healed student's own
    activations; `False` fits them all on the teacher's (`heal_sequential=`, the same setting, is deprecated). A run
    starting at block 0 has no block before it and is left as it is (listed as `skipped`). The step in the
    `PrunedConfig` records the method, calibration tokens and runs healed. Not available for Gemma3, whose
    post-feedforward norm sits between `down_proj` and the residual stream.
    """
    from .spec import DepthSpec  # the rules of a depth part have one home: the spec checks its own values

    check_supported(model)
    n_layers = len(decoder_layers(model))
    heal = DepthSpec(method=method, n=n, remove=remove, heal=heal).heal
    if heal_sequential is not None:  # the HealSpec's own field, given twice before it had one home
        warnings.warn(
            "prune_depth(heal_sequential=...) is deprecated: pass heal=HealSpec(method, sequential=...) (removed in "
            f"hf_recover {REMOVED_IN}).",
            DeprecationWarning,
            stacklevel=2,
        )
        if heal is not None:
            heal = replace(heal, sequential=heal_sequential)
    check_heal(model, heal, data)
    removed, method, scores = plan_removal(model, n_layers, remove, n, method, scores, data)
    description, greedy_kl = None, None
    if removed is None and method == "greedy":
        removed, greedy_kl, tokens, sequences = greedy_block_removal(
            model, data, n, batch_size=batch_size, max_batches=max_batches
        )
        description = describe_data(data, tokens, sequences)
    elif removed is None:  # scored on data, which the checks above made sure is there
        n_blocks = n if method == "angular" else 1
        scores, tokens, sequences = _block_scores(
            model,
            data,
            method=SCORE_FOR_METHOD[method],
            n_blocks=n_blocks,
            batch_size=batch_size,
            max_batches=max_batches,
        )
        description = describe_data(data, tokens, sequences)
        removed = _choose_blocks(scores, n, method)

    teacher = base_pruned_config(model)
    previous = PrunedConfig.find_for(model)
    kept = [i for i in range(n_layers) if i not in set(removed)]
    if heal is not None:  # the teacher's activations, before `inplace=True` removes its blocks
        targets = teacher_targets(
            model, kept, data, sequential=heal.sequential, local=heal.method == "local", batch_size=batch_size,
            max_batches=max_batches,
        )  # fmt: skip
    if not inplace:
        model = copy.deepcopy(model)
    remove_blocks(model, kept)
    step = {"type": "depth", "method": method, "removed": removed}
    if method in SCORE_FOR_METHOD:
        step.update(score=SCORE_FOR_METHOD[method], n_blocks=n if method == "angular" else 1)
        step["scores"] = [round(float(s), 6) for s in scores]
    if greedy_kl is not None:
        step.update(score="forward_kl", kl_after_each_removal=[round(kl, 6) for kl in greedy_kl])
    if heal is not None:
        step["heal"] = heal_cuts(model, kept, targets, data, heal=heal, batch_size=batch_size, max_batches=max_batches)
        if description is None:
            description = describe_data(data, targets["tokens"], targets["sequences"])
    pruned_config = finish_pruning(model, teacher, previous, kept_layer_indices=kept, step=step, data=description)
    return model, pruned_config


def plan_removal(
    model: nn.Module,
    n_layers: int,
    remove: list[int] | None,
    n: int | None,
    method: str,
    scores: torch.Tensor | list[float] | None,
    data: Any,
) -> tuple[list[int] | None, str, list[float] | None]:
    """Check the arguments of a `DepthSpec` (which checked its own values) against the model before anything runs;
    return the blocks to remove when already known (`None` when they must be scored on `data`), the method to record
    and the scores to use."""
    if remove is not None:
        removed = check_layer_indices(remove, n_layers, "remove")
        if len(removed) == n_layers:
            raise ValueError(f"remove lists all {n_layers} blocks; keep at least one.")
        return removed, "manual", None
    if n >= n_layers:
        raise ValueError(f"n must be an int in 1..{n_layers - 1} (the model has {n_layers} blocks), got {n!r}.")
    if method == "last":
        return list(range(n_layers - n, n_layers)), method, None
    if method == "greedy":
        if scores is not None:
            raise ValueError("method='greedy' re-scores the blocks after every removal: pass data=, not scores=.")
        if data is None:
            raise ValueError("method='greedy' scores blocks on calibration data: pass data=.")
        return None, method, None
    if scores is not None:
        scores = [float(s) for s in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
        expected = n_layers if method == "importance" else n_layers - n + 1
        if len(scores) != expected:
            what = "one per block" if method == "importance" else f"one per start of {n} contiguous blocks"
            raise ValueError(
                f"scores has {len(scores)} entries but method={method!r} needs {expected} ({what}); compute them "
                f"with block_importance(model, data, method={SCORE_FOR_METHOD[method]!r}, n_blocks="
                f"{1 if method == 'importance' else n})."
            )
        return _choose_blocks(scores, n, method), method, scores
    if data is None:
        raise ValueError(f"method={method!r} scores blocks on calibration data: pass data= (or scores=).")
    return None, method, None


def _choose_blocks(scores: torch.Tensor | list[float], n: int, method: str) -> list[int]:
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if method == "importance":
        return sorted(torch.argsort(scores, stable=True)[:n].tolist())
    start = int(torch.argmin(scores))  # the first start on ties
    return list(range(start, start + n))


def remove_blocks(model: nn.Module, kept: list[int]) -> None:
    """Keep only blocks `kept` (in order) and renumber everything that indexes blocks."""
    config = model.config
    layers = decoder_layers(model)
    model.model.layers = nn.ModuleList([layers[i] for i in kept])
    for new_index, layer in enumerate(model.model.layers):
        # The decoder layer and its attention both carry `layer_idx`; the KV cache is indexed by it.
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index

    for name in PER_LAYER_CONFIG_FIELDS:
        values = getattr(config, name, None)
        if isinstance(values, list | tuple) and len(values) == len(layers):
            setattr(config, name, [values[i] for i in kept])
    # Qwen2/Qwen3: blocks >= max_window_layers slide. Count the kept full-attention blocks so that the
    # rule, if layer_types is ever rebuilt from it, gives the same sliced pattern.
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = sum(1 for i in kept if i < config.max_window_layers)
    # Gemma3's legacy `sliding_window_pattern` (every k-th block is full) no longer describes the
    # blocks once some are gone; `layer_types` (sliced above) is the authority on reload.
    if getattr(config, "layer_types", None) is not None:
        for name in ("sliding_window_pattern", "_sliding_window_pattern"):
            if name in config.__dict__:
                delattr(config, name)
    config.num_hidden_layers = len(kept)
