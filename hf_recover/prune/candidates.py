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

from ..base.anatomy import check_supported, decoder_layers
from ..base.evaluation import count_parameters, score_models
from ..base.pruned_config import PrunedConfig
from ..base.reporting import format_parameters, format_perplexity
from .spec import PruneSpec

RANK_METRICS = ("perplexity", "kl")


@dataclass
class CandidateResult:
    """One scored candidate. `model` is kept for the best candidate only (the others are freed)."""

    name: str
    spec: PruneSpec
    perplexity: float
    kl: float
    num_layers: int
    num_parameters: int
    pruned_config: PrunedConfig
    model: nn.Module | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec.to_dict(),
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
    candidates: list[PruneSpec | str | Mapping[str, Any]] | Mapping[str, PruneSpec | str | Mapping[str, Any]],
    eval_data: Any,
    *,
    calibration_data: Any = None,
    rank_by: str = "perplexity",
    batch_size: int = 8,
    max_batches: int | None = None,
) -> CandidateReport:
    """Prune `teacher` into each candidate, score all of them on `eval_data`, and rank them.

    A candidate is a prune spec in any form `PruneSpec.parse` takes: `"importance:6"`, `"remove:3,12"`,
    `{"width": {"pruning_ratio": 0.2, "method": "maw"}}`, `PruneSpec(...)` (`hf_recover.prune.spec`). `candidates`
    is a list of specs (named by their shorthand) or a `{name: spec}` dict. Every spec is checked before any
    candidate is built.

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
        try:
            spec.check(teacher, calibration)
        except ValueError as error:
            raise ValueError(f"candidate {name!r}: {error}") from None

    block_scores: dict[tuple[str, int], torch.Tensor] = {}  # shared by candidates that score the same way
    built: dict[str, tuple[nn.Module, PrunedConfig]] = {}
    for name, spec in tqdm(named.items(), desc="Building candidates", leave=False):
        built[name] = spec.build(
            _share_teacher_tensors(teacher), calibration, inplace=True, block_scores=block_scores,
            batch_size=batch_size, max_batches=max_batches,
        )  # fmt: skip

    metrics, teacher_ppl, tokens = _score(
        teacher, {k: m for k, (m, _) in built.items()}, eval_data, batch_size, max_batches
    )
    results = [
        CandidateResult(
            name=name,
            spec=named[name],
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


def _name_specs(candidates) -> dict[str, PruneSpec]:
    if isinstance(candidates, Mapping):
        named = {name: PruneSpec.parse(spec) for name, spec in candidates.items()}
    elif isinstance(candidates, list | tuple):
        named = {}
        for spec in map(PruneSpec.parse, candidates):
            name = str(spec)
            named[name if name not in named else f"{name} #{len(named) + 1}"] = spec
    else:
        raise ValueError("candidates must be a list of specs or a {name: spec} dict.")
    if not named:
        raise ValueError('candidates is empty; give at least one spec, e.g. "importance:6".')
    return named


def _share_teacher_tensors(teacher: nn.Module) -> nn.Module:
    """A copy of `teacher`'s modules and config that reuses its parameters and buffers (no memory).

    Pruning replaces modules and never writes into tensors, so the teacher stays intact.
    """
    memo = {id(t): t for t in (*teacher.parameters(), *teacher.buffers())}
    return copy.deepcopy(teacher, memo)


def _score(
    teacher: nn.Module, models: dict[str, nn.Module], eval_data: Any, batch_size: int, max_batches: int | None
) -> tuple[dict[str, dict[str, float]], float, int]:
    """Perplexity and mean KL(teacher || model) per valid token for every model; teacher perplexity."""
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
