"""Build several pruned candidates from one teacher, score them on held-out data, rank them."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluation import count_parameters
from ..pruned_config import PrunedConfig
from ..reporting import format_parameters, format_perplexity
from ._model import attention_heads, check_supported, decoder_layers, mlp_sizes
from .depth import _SCORE_FOR_METHOD, DEPTH_METHODS, _plan_removal, prune_depth
from .healing import check_heal
from .importance import _block_scores, check_layer_indices
from .width import WIDTH_METHODS, plan_heads_and_hidden, prune_width, target_sizes, width_needs_data

SPEC_KEYS = ("depth", "width")
DEPTH_SPEC_KEYS = ("remove", "n", "method", "heal")
WIDTH_SPEC_KEYS = ("pruning_ratio", "expansion_rate", "divisor", "method", "layers", "heads", "hidden_size")
RANK_METRICS = ("perplexity", "kl")


@dataclass
class CandidateResult:
    """One scored candidate. `model` is kept for the best candidate only (the others are freed)."""

    name: str
    spec: dict[str, Any]
    perplexity: float
    kl: float
    num_layers: int
    num_parameters: int
    pruned_config: PrunedConfig
    model: nn.Module | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec,
            "perplexity": self.perplexity,
            "kl": self.kl,
            "num_layers": self.num_layers,
            "num_parameters": self.num_parameters,
            "removed_layer_indices": self.pruned_config.removed_layer_indices,
            "student_intermediate_sizes": self.pruned_config.student_intermediate_sizes,
        }


@dataclass
class CandidateReport:
    """Candidates ranked by `rank_by` (`"perplexity"` or `"kl"`, lower is better); `best` is the first.

    `kl` is the mean forward KL(teacher || candidate) per valid next-token position, in nats.
    """

    results: list[CandidateResult]
    rank_by: str
    teacher_perplexity: float
    teacher_num_parameters: int
    tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> CandidateResult:
        """The best candidate: its `spec`, `model` (independent of the teacher) and `pruned_config`."""
        return self.results[0]

    def _rows(self) -> list[list[str]]:
        teacher_ppl = format_perplexity(self.teacher_perplexity)
        rows = [["rank", "candidate", "blocks", "params", f"PPL (teacher {teacher_ppl})", "KL"]]
        for rank, r in enumerate(self.results, 1):
            rows.append(
                [
                    str(rank),
                    r.name,
                    str(r.num_layers),
                    format_parameters(r.num_parameters),
                    format_perplexity(r.perplexity),
                    f"{r.kl:.4f}",
                ]
            )
        return rows

    def __str__(self) -> str:
        rows = self._rows()
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        footer = f"ranked by {self.rank_by} on {self.tokens} held-out tokens; KL = mean KL(teacher || candidate)"
        return "\n".join([*lines, footer])

    def to_markdown(self) -> str:
        rows = self._rows()
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
        return "\n".join(lines) + f"\n\nRanked by {self.rank_by} on {self.tokens} held-out tokens.\n"

    def to_json(self) -> str:
        payload = {
            "rank_by": self.rank_by,
            "teacher_perplexity": self.teacher_perplexity,
            "teacher_num_parameters": self.teacher_num_parameters,
            "tokens": self.tokens,
            "candidates": [r.to_dict() for r in self.results],
            **self.extra,
        }
        return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def select_candidate(
    teacher: nn.Module,
    candidates: list[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
    eval_data: Any,
    *,
    calibration_data: Any = None,
    rank_by: str = "perplexity",
    batch_size: int = 8,
    max_batches: int | None = None,
) -> CandidateReport:
    """Prune `teacher` into each candidate, score all of them on `eval_data`, and rank them.

    A candidate spec is a dict with a `"depth"` and/or a `"width"` entry (depth is applied first),
    holding `prune_depth` / `prune_width` keyword arguments:
    `{"depth": {"method": "importance", "n": 6}}`, `{"depth": {"remove": [3, 12]}}`,
    `{"width": {"pruning_ratio": 0.2, "method": "maw"}}`. `candidates` is a list of specs (named after
    their content) or a `{name: spec}` dict. Every spec is checked before any candidate is built.

    Blocks and neurons are scored on `calibration_data` (default: `eval_data`; pass separate data to
    keep the scoring and the evaluation apart). Each candidate gets its perplexity and its mean forward
    KL(teacher || candidate) per valid token on `eval_data` (at most `max_batches` batches); the teacher's
    logits are computed once per batch and shared by all candidates, which share the teacher's unchanged
    tensors, so memory grows only by what each candidate rebuilds. Ranked by `rank_by` (`"perplexity"`
    or `"kl"`); `report.best.model` is an independent copy, safe to train.
    """
    check_supported(teacher)
    if rank_by not in RANK_METRICS:
        raise ValueError(f"rank_by must be one of {list(RANK_METRICS)}, got {rank_by!r}.")
    named = _name_specs(candidates)
    calibration = eval_data if calibration_data is None else calibration_data
    for name, spec in named.items():
        _check_spec(teacher, name, spec, calibration)

    block_scores: dict[tuple[str, int], torch.Tensor] = {}  # shared by candidates that score the same way
    built: dict[str, tuple[nn.Module, PrunedConfig]] = {}
    for name, spec in tqdm(named.items(), desc="Building candidates", leave=False):
        built[name] = _build(teacher, spec, calibration, block_scores, batch_size, max_batches)

    metrics, teacher_ppl, tokens = _score(
        teacher, {k: m for k, (m, _) in built.items()}, eval_data, batch_size, max_batches
    )
    results = [
        CandidateResult(
            name=name,
            spec=copy.deepcopy(dict(named[name])),
            perplexity=metrics[name]["perplexity"],
            kl=metrics[name]["kl"],
            num_layers=len(decoder_layers(model)),
            num_parameters=pruned_config.student_num_parameters,
            pruned_config=pruned_config,
        )
        for name, (model, pruned_config) in built.items()
    ]
    results.sort(key=lambda r: math.inf if math.isnan(getattr(r, rank_by)) else getattr(r, rank_by))
    best_model = built[results[0].name][0]
    # Candidates share the teacher's tensors; a fresh deep copy owns its own, so training it never
    # changes the teacher.
    results[0].model = copy.deepcopy(best_model)
    built.clear()
    return CandidateReport(
        results=results,
        rank_by=rank_by,
        teacher_perplexity=teacher_ppl,
        teacher_num_parameters=count_parameters(teacher),
        tokens=tokens,
        extra={"block_scores": {f"{m}:n_blocks={n}": s.tolist() for (m, n), s in block_scores.items()}},
    )


def _name_specs(candidates) -> dict[str, Mapping[str, Any]]:
    if isinstance(candidates, Mapping):
        named = dict(candidates)
    elif isinstance(candidates, list | tuple):
        named = {}
        for spec in candidates:
            name = _spec_name(spec) if isinstance(spec, Mapping) else repr(spec)
            named[name if name not in named else f"{name} #{len(named) + 1}"] = spec
    else:
        raise ValueError("candidates must be a list of specs or a {name: spec} dict.")
    if not named:
        raise ValueError(
            'candidates is empty; give at least one spec, e.g. {"depth": {"method": "importance", "n": 6}}.'
        )
    return named


def _spec_name(spec: Mapping[str, Any]) -> str:
    parts = []
    for kind in SPEC_KEYS:
        if isinstance(spec.get(kind), Mapping):
            args = dict(spec[kind])
            if kind == "depth" and "remove" in args:
                parts.append(f"depth remove={args['remove']}")
                continue
            method = args.pop("method", "importance" if kind == "depth" else "maw")
            parts.append(f"{kind}:{method} " + " ".join(f"{k}={v}" for k, v in args.items()))
    return " + ".join(p.strip() for p in parts)


def _check_spec(teacher: nn.Module, name: str, spec: Any, calibration: Any) -> None:
    """Validate a spec completely without building anything (the same checks prune_* run)."""
    where = f"candidate {name!r}"
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f'{where}: a spec is a dict with "depth" and/or "width" entries, got {spec!r}.')
    bad = sorted(set(spec) - set(SPEC_KEYS))
    if bad:
        raise ValueError(f"{where}: unknown key(s) {bad}; valid keys are {list(SPEC_KEYS)}.")
    n_layers = len(decoder_layers(teacher))
    sizes = mlp_sizes(teacher)
    heads = attention_heads(teacher)
    if "depth" in spec:
        depth = spec["depth"]
        if not isinstance(depth, Mapping):
            raise ValueError(f"{where}: 'depth' must be a dict of prune_depth arguments, got {depth!r}.")
        bad = sorted(set(depth) - set(DEPTH_SPEC_KEYS))
        if bad:
            raise ValueError(f"{where}: unknown depth key(s) {bad}; valid depth keys are {list(DEPTH_SPEC_KEYS)}.")
        method = depth.get("method", "importance")
        if "remove" not in depth and method not in DEPTH_METHODS:
            raise ValueError(f"{where}: depth method must be one of {list(DEPTH_METHODS)}, got {method!r}.")
        try:
            check_heal(teacher, depth.get("heal"), calibration)
            removed, _, _ = _plan_removal(
                teacher, n_layers, depth.get("remove"), depth.get("n"), method, None, calibration
            )
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        n_removed = len(removed) if removed is not None else depth["n"]
        n_layers -= n_removed
        # Which blocks importance removes is not known yet; their MLP sizes only matter if they differ.
        sizes = [s for i, s in enumerate(sizes) if i not in set(removed)] if removed is not None else sizes[:n_layers]
        heads = [h for i, h in enumerate(heads) if i not in set(removed)] if removed is not None else heads[:n_layers]
    if "width" in spec:
        width = spec["width"]
        if not isinstance(width, Mapping):
            raise ValueError(f"{where}: 'width' must be a dict of prune_width arguments, got {width!r}.")
        bad = sorted(set(width) - set(WIDTH_SPEC_KEYS))
        if bad:
            raise ValueError(f"{where}: unknown width key(s) {bad}; valid width keys are {list(WIDTH_SPEC_KEYS)}.")
        method = width.get("method", "maw")
        try:
            if method not in WIDTH_METHODS:
                raise ValueError(f"method must be one of {list(WIDTH_METHODS)}, got {method!r}.")
            layers = check_layer_indices(width.get("layers"), n_layers, "layers")
            new_axes = width.get("heads") is not None or width.get("hidden_size") is not None
            if not new_axes or width.get("pruning_ratio") is not None or width.get("expansion_rate") is not None:
                target_sizes(
                    [sizes[i] for i in layers],
                    teacher.config.hidden_size,
                    pruning_ratio=width.get("pruning_ratio"),
                    expansion_rate=width.get("expansion_rate"),
                    divisor=width.get("divisor", 1),
                )
            plan_heads_and_hidden(
                teacher, width.get("heads"), width.get("hidden_size"), layers, calibration, head_counts=heads
            )
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None


def _share_teacher_tensors(teacher: nn.Module) -> nn.Module:
    """A copy of `teacher`'s modules and config that reuses its parameters and buffers (no memory).

    Pruning replaces modules and never writes into tensors, so the teacher stays intact.
    """
    memo = {id(t): t for t in (*teacher.parameters(), *teacher.buffers())}
    return copy.deepcopy(teacher, memo)


def _build(
    teacher: nn.Module,
    spec: Mapping[str, Any],
    calibration: Any,
    block_scores: dict[tuple[str, int], torch.Tensor],
    batch_size: int,
    max_batches: int | None,
) -> tuple[nn.Module, PrunedConfig]:
    model = _share_teacher_tensors(teacher)
    pruned_config = None
    if "depth" in spec:
        depth = dict(spec["depth"])
        method = depth.get("method", "importance")
        if "remove" not in depth and method in _SCORE_FOR_METHOD:
            n_blocks = depth["n"] if method == "angular" else 1
            key = (_SCORE_FOR_METHOD[method], n_blocks)
            if key not in block_scores:
                block_scores[key], _, _ = _block_scores(
                    teacher,
                    calibration,
                    method=key[0],
                    n_blocks=n_blocks,
                    batch_size=batch_size,
                    max_batches=max_batches,
                )
            depth["scores"] = block_scores[key]
        if depth.get("heal") is not None:
            depth.update(data=calibration, batch_size=batch_size, max_batches=max_batches)
        model, pruned_config = prune_depth(model, inplace=True, **depth)
    if "width" in spec:
        width = dict(spec["width"])
        data = calibration if width_needs_data(width) else None
        model, pruned_config = prune_width(
            model, inplace=True, data=data, batch_size=batch_size, max_batches=max_batches, **width
        )
    return model, pruned_config


def _score(
    teacher: nn.Module, models: dict[str, nn.Module], eval_data: Any, batch_size: int, max_batches: int | None
) -> tuple[dict[str, dict[str, float]], float, int]:
    """Perplexity and mean KL(teacher || model) per valid token for every model; teacher perplexity."""
    from ..evaluation import score_models

    teacher_name = object.__repr__(teacher)  # a name no candidate has
    scores = score_models(
        {teacher_name: teacher, **models},
        eval_data,
        reference=teacher_name,
        batch_size=batch_size,
        max_batches=max_batches,
        desc="Scoring candidates",
    )
    teacher_scores = scores.pop(teacher_name)
    return scores, teacher_scores["perplexity"], teacher_scores["tokens"]
