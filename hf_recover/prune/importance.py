"""How much each block, and each MLP neuron, matters: the scores depth and width pruning rank by.

Block scores come from the hidden states around each block on calibration data (ShortGPT's block
influence, Gromov et al.'s angular distance); neuron scores from the GLU weights (MAW, VOW, PON, as
optipfair) or from weights and activations together.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..base.anatomy import check_glu_mlp, check_supported, decoder_layers, model_device
from ..base.data import iter_batches, num_batches
from .calibration import calibration_pass

BLOCK_METHODS = ("block_influence", "angular")
NEURON_METHODS = ("maw", "vow", "pon", "activation")
_MODEL_INPUTS = ("input_ids", "attention_mask")


def block_importance(
    model: torch.nn.Module,
    data: Any,
    *,
    method: str = "block_influence",
    n_blocks: int = 1,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> torch.Tensor:
    """Score every run of `n_blocks` consecutive blocks on calibration `data`; low means removable.

    Entry `l` compares `x_l`, the input of block `l`, with `x_{l+n}`, the output of block `l+n-1`:
    - `"block_influence"` (ShortGPT, Men et al. 2024): `1 - cos(x_l, x_{l+n})` per token, averaged
      over every real token (padding, `attention_mask == 0`, is excluded);
    - `"angular"` (Gromov et al. 2024): `arccos(cos(x_l, x_{l+n})) / pi` on the last real token of
      each sequence, averaged over sequences.

    `data` is a dataset prepared by `prepare_recovery_dataset`, a list of such rows, or a DataLoader of
    dict batches. Returns a float32 CPU tensor with `num_layers - n_blocks + 1` entries (one per block
    when `n_blocks == 1`). One forward pass per batch, in inference mode.
    """
    scores, _, _ = _block_scores(
        model, data, method=method, n_blocks=n_blocks, batch_size=batch_size, max_batches=max_batches
    )
    return scores


def _check_block_args(model: torch.nn.Module, method: str, n_blocks: int) -> int:
    check_supported(model)
    if method not in BLOCK_METHODS:
        raise ValueError(f"method must be one of {list(BLOCK_METHODS)}, got {method!r}.")
    n_layers = len(decoder_layers(model))
    if not (isinstance(n_blocks, int) and 1 <= n_blocks <= n_layers):
        raise ValueError(f"n_blocks must be an int in 1..{n_layers} (the model's block count), got {n_blocks!r}.")
    return n_layers


@torch.inference_mode()
def _block_scores(
    model: torch.nn.Module,
    data: Any,
    *,
    method: str,
    n_blocks: int,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> tuple[torch.Tensor, int, int]:
    """`block_importance`, plus how many tokens and sequences it saw (for `PrunedConfig.data`)."""
    n_layers = _check_block_args(model, method, n_blocks)
    layers = decoder_layers(model)
    device = model_device(model)
    n_starts = n_layers - n_blocks + 1
    totals = torch.zeros(n_starts, dtype=torch.float64)
    tokens = sequences = 0

    # transformers returns the *final norm's* output as the last hidden state, not the last block's
    # output; capture that one raw so the last block is scored like the others.
    last_output: list[torch.Tensor] = []

    def keep_last_output(module, args, output):
        last_output.append(output[0] if isinstance(output, tuple) else output)

    hook = layers[-1].register_forward_hook(keep_last_output)
    was_training = model.training
    model.eval()
    try:
        batches = iter_batches(
            data, batch_size=batch_size, max_batches=max_batches, device=device, columns=_MODEL_INPUTS
        )
        total = num_batches(data, batch_size=batch_size, max_batches=max_batches)
        for batch in tqdm(batches, total=total, desc=f"Block importance ({method})", leave=False):
            input_ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(input_ids)
            last_output.clear()
            out = model.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            hidden = [*out.hidden_states[:-1], last_output[-1]]  # n_layers + 1 tensors of (B, T, H)
            valid = mask.bool()
            # last real token of each sequence, for left or right padding
            last = mask.shape[1] - 1 - mask.flip(1).float().argmax(1)
            rows = torch.arange(mask.shape[0], device=mask.device)
            for start in range(n_starts):
                cos = F.cosine_similarity(hidden[start].float(), hidden[start + n_blocks].float(), dim=-1)  # (B, T)
                if method == "block_influence":
                    totals[start] += (1 - cos)[valid].double().sum().item()
                else:
                    angle = torch.arccos(cos[rows, last].clamp(-1, 1)) / math.pi
                    totals[start] += angle.double().sum().item()
            tokens += int(valid.sum())
            sequences += input_ids.shape[0]
    finally:
        hook.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("The calibration data has no real token (attention_mask is all 0): nothing to score.")
    count = tokens if method == "block_influence" else sequences
    return (totals / count).float(), tokens, sequences


def plot_block_importance(
    scores: torch.Tensor | list[float],
    path: str | os.PathLike,
    *,
    title: str = "Block importance",
    removed: list[int] | None = None,
) -> Path:
    """Write a PNG bar chart of block scores to `path` (blocks in `removed` drawn in red); return the path."""
    from matplotlib.figure import Figure

    values = [float(s) for s in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
    if not values:
        raise ValueError("scores is empty: there is nothing to plot.")
    removed_set = set(removed or [])
    fig = Figure(figsize=(max(6.0, 0.3 * len(values)), 3.5))  # no pyplot: no global state, no GUI backend
    ax = fig.subplots()
    colors = ["tab:red" if i in removed_set else "tab:blue" for i in range(len(values))]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xlabel("block")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.set_xticks(range(len(values)))
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def neuron_importance(
    model: torch.nn.Module,
    data: Any = None,
    *,
    method: str = "maw",
    layers: list[int] | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> dict[int, torch.Tensor]:
    """Score every GLU MLP neuron of the given blocks (all by default); high means keep.

    Neuron `j` of a block is row `j` of `gate_proj` and `up_proj` (`g`, `u`) and column `j` of
    `down_proj` (`d`):
    - `"maw"` (maximum absolute weight, optipfair's PPM): `(max(g) + |min(g)|) + (max(u) + |min(u)|)`;
    - `"vow"` (variance of weights): `var(g) + var(u)`;
    - `"pon"` (product of norms): `||g||_1 * ||u||_1`;
    - `"activation"` (weights and activations, as Wanda/CFSP): `||d||_2 * ||h_j||_2`, where `h_j` is the
      neuron's output `act(g.x) * (u.x)` over the real tokens of calibration `data`: the size of the
      neuron's contribution to the block output. Needs `data`.
    Returns `{block index: float32 CPU tensor of shape (intermediate_size,)}`.
    """
    layer_indices = _check_neuron_args(model, method, data, layers)
    scores, _, _ = _neuron_scores(model, method, data, layer_indices, batch_size, max_batches)
    return scores


def _neuron_scores(
    model: torch.nn.Module, method: str, data: Any, layer_indices: list[int], batch_size: int, max_batches: int | None
) -> tuple[dict[int, torch.Tensor], int, int]:
    """`neuron_importance` on checked arguments, plus the calibration tokens and sequences seen."""
    blocks = decoder_layers(model)
    tokens = sequences = 0
    if method == "activation":
        activation_norms, tokens, sequences = _activation_norms(model, data, layer_indices, batch_size, max_batches)
    scores = {}
    with torch.no_grad():
        for i in layer_indices:
            mlp = blocks[i].mlp
            gate, up = mlp.gate_proj.weight.float(), mlp.up_proj.weight.float()  # (I, H)
            if method == "maw":
                score = _max_abs(gate) + _max_abs(up)
            elif method == "vow":
                score = gate.var(dim=1) + up.var(dim=1)
            elif method == "pon":
                score = gate.abs().sum(dim=1) * up.abs().sum(dim=1)
            else:
                score = mlp.down_proj.weight.float().norm(dim=0) * activation_norms[i]  # (H, I) -> (I,)
            scores[i] = score.cpu()
    return scores, tokens, sequences


def _max_abs(weight: torch.Tensor) -> torch.Tensor:
    return weight.max(dim=1).values + weight.min(dim=1).values.abs()


def _check_neuron_args(model: torch.nn.Module, method: str, data: Any, layers: list[int] | None) -> list[int]:
    check_supported(model)
    if method not in NEURON_METHODS:
        raise ValueError(f"method must be one of {list(NEURON_METHODS)}, got {method!r}.")
    if method == "activation" and data is None:
        raise ValueError("method='activation' scores neurons on calibration data: pass data=.")
    blocks = decoder_layers(model)
    indices = check_layer_indices(layers, len(blocks), "layers")
    for i in indices:
        check_glu_mlp(blocks[i], i)
    return indices


def check_layer_indices(indices: list[int] | None, n_layers: int, name: str) -> list[int]:
    """Validate block indices (ints, in range, no duplicates); `None` means every block."""
    if indices is None:
        return list(range(n_layers))
    indices = list(indices)
    if not indices:
        raise ValueError(f"{name} is empty; give at least one block index, or None for every block.")
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"{name} has {bad} outside the model's blocks 0..{n_layers - 1}.")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise ValueError(f"{name} lists blocks {duplicates} more than once.")
    return sorted(indices)


def _activation_norms(
    model: torch.nn.Module, data: Any, layer_indices: list[int], batch_size: int, max_batches: int | None
) -> tuple[dict[int, torch.Tensor], int, int]:
    """L2 norm over real tokens of every neuron's output (the input of `down_proj`), per block."""
    blocks = decoder_layers(model)
    sums = {i: torch.zeros(blocks[i].mlp.down_proj.in_features, dtype=torch.float64) for i in layer_indices}

    def register(valid: list[torch.Tensor]) -> list:
        def make_hook(i: int):
            def hook(module, args):
                h = args[0].float()  # (B, T, I)
                sums[i] += (h.square() * valid[0].unsqueeze(-1)).sum(dim=(0, 1)).double().cpu()

            return hook

        return [blocks[i].mlp.down_proj.register_forward_pre_hook(make_hook(i)) for i in layer_indices]

    tokens, sequences = calibration_pass(
        model, data, register, batch_size=batch_size, max_batches=max_batches, desc="Neuron activations"
    )
    return {i: s.sqrt().float() for i, s in sums.items()}, tokens, sequences
