"""Training-free healing of a depth cut: a linear map folded into the block before each removed run.

When blocks `i+1..j` are removed, block `i`'s output `Y + M` (`M` its MLP output, `Y` the rest: its
input plus attention) reaches block `j+1` instead of the teacher's `L_j`. A linear map `T`, fitted on
calibration tokens so that `Y + M·T ≈ L_j`, stands in for what the removed run added; it is folded
into block `i`'s `down_proj` (`W_down ← Tᵀ·W_down`, since `M = h·W_downᵀ`), so the student stays a plain
model of its class with no new parameter (ReplaceMe, Shopkhoev et al. 2025, fits such maps for
contiguous spans).

- `"lstsq"`: least squares, solved in float64, with a small ridge pulling `T` towards the identity
  (the map of a cut that removed nothing) so that rarely used directions stay as they were;
- `"cosine"`: starts from the least-squares map and lowers the mean cosine distance
  `1 - cos(Y + M·T, L_j)` over the calibration tokens with L-BFGS (ReplaceMe reports that the cosine
  fit transfers better than least squares).

How to choose: prefer `"lstsq"` for language modelling. The cosine fit lowers the cosine distance it is asked to
but leaves the norm of the residual stream free, which costs perplexity. Give the fit many more calibration tokens
than `hidden_size`, and calibrate on what the model is valued for (a chat model's answers as well as text): the map
fits the activations it sees. `"local"` then trains the block that carries each map (`hf_recover.prune.
local_healing`). The measurements are in the documentation (docs/pruning.md).

Maps are fitted one cut after another on the student's own activations (`sequential=True`, the
default), so a later fit sees, and can make up for, what the earlier healed cuts still miss; with
`sequential=False` every map is fitted on the teacher's activations. A run that starts at block 0
has no block before it to carry the map: it is left unhealed and listed under `skipped`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base.anatomy import decoder_layers, has_norm_after_mlp, new_linear
from ..base.evaluation import evaluate_perplexity
from .calibration import StopCalibrationForward, calibration_pass
from .local_healing import LOCAL_OBJECTIVES, block_inputs, block_outputs, train_block

HEAL_METHODS = ("lstsq", "cosine", "local")
"""`lstsq` and `cosine`: a linear map folded into the block before each removed span; `local`: the least-squares
map, then that block trained alone against the teacher's hidden state after the span
(`hf_recover.prune.local_healing`)."""


@dataclass(frozen=True)
class HealSpec:
    """How the cuts of a depth pruning are healed before any global training (see `hf_recover.prune.healing`)."""

    method: str = "lstsq"
    """One of `HEAL_METHODS`."""
    sequential: bool = True
    """Fit the maps one cut after another on the healed student's own activations (False: on the teacher's)."""
    steps: int = 200
    """`local` only: AdamW steps of each bordering block, one calibration batch each."""
    learning_rate: float = 3e-4
    """`local` only: the steps' learning rate."""
    objective: str = "nmse"
    """`local` only: one of `LOCAL_OBJECTIVES` (`nmse`: mean squared difference of RMS-normalised hidden states)."""

    def __post_init__(self):
        if self.method not in HEAL_METHODS:
            raise ValueError(f"heal takes one of {list(HEAL_METHODS)}, got {self.method!r}.")
        if not isinstance(self.sequential, bool):
            raise ValueError(f"heal sequential must be True or False, got {self.sequential!r}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"heal steps must be an int >= 1, got {self.steps!r}.")
        if not (isinstance(self.learning_rate, int | float) and self.learning_rate > 0):
            raise ValueError(f"heal learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.objective not in LOCAL_OBJECTIVES:
            raise ValueError(f"heal objective must be one of {list(LOCAL_OBJECTIVES)}, got {self.objective!r}.")
        if self.method != "local" and (self.steps, self.learning_rate, self.objective) != _LOCAL_DEFAULTS:
            raise ValueError(f"heal steps, learning_rate and objective are for method 'local', not {self.method!r}.")

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | HealSpec | None) -> HealSpec | None:
        """`"lstsq"`, `{"method": "local", "steps": 100}`, a `HealSpec` or None."""
        if value is None or isinstance(value, HealSpec):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, Mapping):
            known = [f.name for f in fields(cls)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"heal has unknown key(s) {unknown}; its keys are {known}.")
            return cls(**value)
        raise ValueError(f"heal must be a method name or a dict of HealSpec fields, got {value!r}.")

    def to_dict(self) -> str | dict[str, Any]:
        """The method alone when every other setting is the default (the form specs are written in)."""
        if self.has_shorthand:
            return self.method
        defaults = HealSpec(self.method)
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name == "method" or getattr(self, f.name) != getattr(defaults, f.name)
        }

    @property
    def has_shorthand(self) -> bool:
        return self == HealSpec(self.method)

    def __str__(self) -> str:
        return self.method if self.has_shorthand else json.dumps(self.to_dict())


_LOCAL_DEFAULTS = (HealSpec.steps, HealSpec.learning_rate, HealSpec.objective)


def removed_spans(removed: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of removed blocks as `(first, last)` teacher indices, in order."""
    spans: list[tuple[int, int]] = []
    for index in sorted(removed):
        if spans and spans[-1][1] == index - 1:
            spans[-1] = (spans[-1][0], index)
        else:
            spans.append((index, index))
    return spans


def check_heal(model: nn.Module, heal: HealSpec | None, data: Any) -> None:
    """Refuse a heal that `model` or the missing calibration `data` cannot do, before any work is done."""
    if heal is None:
        return
    if data is None:
        raise ValueError(f"heal={heal.method!r} fits its maps on calibration activations: pass data= as well.")
    layer = decoder_layers(model)[0]
    if has_norm_after_mlp(model):
        raise ValueError(
            f"heal is not supported for {model.config.model_type}: a norm sits between its down_proj and the "
            "residual stream, so a linear map folded into down_proj cannot reproduce the fitted one. Prune "
            "without heal=."
        )
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise ValueError("heal folds its map into each block's `mlp.down_proj`, which this model lacks as nn.Linear.")


class _Taps:
    """Forward hooks that keep, for the real tokens of every batch, a block's MLP output and block output, and end
    the forward after the last block they need."""

    def __init__(self, layers: nn.ModuleList, mlp_blocks: list[int], output_blocks: list[int]):
        self.mlp: dict[int, list[torch.Tensor]] = {i: [] for i in mlp_blocks}
        self.out: dict[int, list[torch.Tensor]] = {i: [] for i in output_blocks}
        self._layers, self._mlp_blocks, self._output_blocks = layers, mlp_blocks, output_blocks

    def register(self, valid: list[torch.Tensor]) -> list[Any]:
        layers, keep = self._layers, self._keeper(valid)
        handles = [layers[i].mlp.register_forward_hook(keep(self.mlp[i])) for i in self._mlp_blocks]
        handles += [layers[i].register_forward_hook(keep(self.out[i])) for i in self._output_blocks]
        last = max([*self._mlp_blocks, *self._output_blocks])
        handles.append(layers[last].register_forward_hook(self._stop))  # after the taps above
        return handles

    @staticmethod
    def _stop(module, args, output):
        raise StopCalibrationForward

    @staticmethod
    def _keeper(valid: list[torch.Tensor]):
        def keep(store: list[torch.Tensor]):
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                store.append(hidden[valid[0].bool()].float().cpu())  # (real tokens, hidden)

            return hook

        return keep


def _collect(
    model: nn.Module,
    data: Any,
    mlp_blocks: list[int],
    output_blocks: list[int],
    batch_size: int,
    max_batches: int | None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], int, int]:
    """MLP outputs of `mlp_blocks` and outputs of `output_blocks` over the real calibration tokens,
    and how many tokens and sequences that was (none, with no pass, when no block is asked for)."""
    if not mlp_blocks and not output_blocks:  # every run starts at block 0: nothing to heal
        return {}, {}, 0, 0
    taps = _Taps(decoder_layers(model), mlp_blocks, output_blocks)
    tokens, sequences = calibration_pass(
        model, data, taps.register, batch_size=batch_size, max_batches=max_batches, desc="Healing calibration"
    )
    # torch.cat outside inference mode: plain tensors, which the cosine fit may use with autograd
    mlp = {i: torch.cat(v) for i, v in taps.mlp.items()}
    return mlp, {i: torch.cat(v) for i, v in taps.out.items()}, tokens, sequences


def fit_lstsq(mlp_out: torch.Tensor, target: torch.Tensor, *, ridge: float = 1e-4) -> torch.Tensor:
    """`T` minimising `|mlp_out·T - target|² + λ·|T - I|²`, in float64; `λ = ridge · mean eigenvalue of MᵀM`."""
    m = mlp_out.double()
    gram = m.T @ m
    size = gram.shape[0]
    strength = ridge * float(gram.diagonal().mean())
    identity = torch.eye(size, dtype=torch.float64)
    return torch.linalg.solve(gram + strength * identity, m.T @ target.double() + strength * identity)


def fit_cosine(
    mlp_out: torch.Tensor, rest: torch.Tensor, wanted: torch.Tensor, start: torch.Tensor, *, steps: int = 40
) -> torch.Tensor:
    """`T` lowering the mean of `1 - cos(rest + mlp_out·T, wanted)`, by L-BFGS from `start`."""
    transform = start.float().contiguous().requires_grad_(True)
    optimizer = torch.optim.LBFGS([transform], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = cosine_distance(rest + mlp_out @ transform, wanted)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return transform.detach().double()


def cosine_distance(actual: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of `1 - cos(actual, wanted)`."""
    return (1 - F.cosine_similarity(actual, wanted, dim=-1)).mean()


def fold_into_down_proj(mlp: nn.Module, transform: torch.Tensor) -> None:
    """Make `mlp`'s output `M·T` instead of `M`: `W_down ← Tᵀ·W_down` (and `b ← Tᵀ·b`), as a new layer."""
    down = mlp.down_proj
    folded = new_linear(down.in_features, down.out_features, down)
    with torch.no_grad():
        t = transform.to(device=down.weight.device, dtype=torch.float64)
        folded.weight.copy_((t.T @ down.weight.double()).to(down.weight.dtype))
        if down.bias is not None:
            folded.bias.copy_((t.T @ down.bias.double()).to(down.bias.dtype))
    mlp.down_proj = folded


def teacher_targets(
    teacher: nn.Module,
    kept: list[int],
    data: Any,
    *,
    sequential: bool = True,
    local: bool = False,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """What the maps are fitted to, from `teacher` with all its blocks (collected before they go): the
    output of each removed run's last block and, when fitting on the teacher's activations, the MLP
    output and output of the block before the run."""
    spans, skipped = healable_spans(kept, len(decoder_layers(teacher)))
    before = [] if sequential else sorted({b for b, _ in spans})
    outputs = sorted({last for _, last in spans} | set(before))
    mlp, out, tokens, sequences = _collect(teacher, data, before, outputs, batch_size, max_batches)
    states = {  # whole sequences of the hidden state after each span, for block-local distillation
        last: block_outputs(teacher, last, data, batch_size=batch_size, max_batches=max_batches)
        for _, last in (spans if local else [])
    }
    return {
        "states": states,
        "spans": spans,
        "skipped": skipped,
        "mlp": mlp,
        "out": out,
        "tokens": tokens,
        "sequences": sequences,
        "sequential": sequential,
    }


def heal_cuts(
    student: nn.Module,
    kept: list[int],
    targets: dict[str, Any],
    data: Any,
    *,
    heal: HealSpec = HealSpec(),
    batch_size: int = 8,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Fit and fold one map per removed run into `student` (the teacher's blocks `kept`, in order); with
    `heal.method == "local"`, then train each block that took a map alone (`hf_recover.prune.local_healing`).

    `targets` comes from `teacher_targets` on the same `data`. Returns the record for `PrunedConfig`: method, where
    the maps were fitted, calibration tokens, the runs healed as `[kept block before it, last removed block]` teacher
    indices, the runs skipped (those starting at block 0), and the student's perplexity on the calibration data
    before and after healing (in-sample: the tokens the maps were fitted on).
    """
    before_healing = calibration_perplexity(student, data, batch_size, max_batches)
    sequential = targets["sequential"]
    student_layers = decoder_layers(student)
    for before, last in targets["spans"]:
        wanted = targets["out"][last]
        block = kept.index(before)
        if sequential:  # the student as healed so far: later maps see what earlier ones still miss
            mlp_out, output, _, _ = _collect(student, data, [block], [block], batch_size, max_batches)
            mlp_out, output = mlp_out[block], output[block]
        else:
            mlp_out, output = targets["mlp"][before], targets["out"][before]
        rest = output - mlp_out
        transform = fit_lstsq(mlp_out, wanted - rest)
        if heal.method == "cosine":
            transform = fit_cosine(mlp_out, rest, wanted, transform)
        fold_into_down_proj(student_layers[block].mlp, transform)
    record = {}
    if heal.method == "local":  # after every map: each block's inputs are those of the student as healed
        losses = []
        for before, last in targets["spans"]:
            block = kept.index(before)
            inputs = block_inputs(student, block, data, batch_size=batch_size, max_batches=max_batches)
            trace = train_block(
                student_layers[block], inputs, targets["states"][last], steps=heal.steps,
                learning_rate=heal.learning_rate, objective=heal.objective,
            )  # fmt: skip
            losses.append([round(trace[0], 6), round(sum(trace[-10:]) / len(trace[-10:]), 6)])
        record = {"steps": heal.steps, "learning_rate": heal.learning_rate, "objective": heal.objective}
        record["loss_first_last"] = losses
    return {
        "method": heal.method,
        **record,
        "fit_on": "student" if sequential else "teacher",
        "calibration_tokens": targets["tokens"],
        "spans": [[before, last] for before, last in targets["spans"]],
        "skipped": targets["skipped"],
        "calibration_perplexity": {
            "before": round(before_healing, 4),
            "after": round(calibration_perplexity(student, data, batch_size, max_batches), 4),
        },
    }


def calibration_perplexity(model: nn.Module, data: Any, batch_size: int, max_batches: int | None) -> float:
    """The model's perplexity on the calibration data (in-sample for what was fitted on it)."""
    return evaluate_perplexity(
        model, data, batch_size=batch_size, max_batches=max_batches, desc="Calibration perplexity"
    )["perplexity"]


def healable_spans(kept: list[int], n_layers: int) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """`(kept block before the run, last removed block)` per removed run, and the runs that start at block 0."""
    kept_set = set(kept)
    removed = [i for i in range(n_layers) if i not in kept_set]
    spans, skipped = [], []
    for first, last in removed_spans(removed):
        if first == 0:
            skipped.append([first, last])  # nothing before it to carry a map
        else:
            spans.append((first - 1, last))
    return spans, skipped
