"""What was pruned, as a model card reads it: the plain values the card's "What was pruned" section words, taken
from a `PrunedConfig` (its steps, every healing step, MLP sizes and attention heads)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..base.pruned_config import PrunedConfig

# step keys the template words itself; any other short value a step records is listed by its name
_WORDED_STEP_KEYS = {"type", "method", "scores", "score", "removed", "n_blocks", "pruning_ratio", "expansion_rate"}
_WORDED_STEP_KEYS |= {"divisor", "layers", "heal"}


def pruning_facts(pruned: PrunedConfig, metrics: Mapping[str, Any]) -> dict[str, Any]:
    teacher_params = metrics.get("teacher_parameters") or pruned.teacher_num_parameters
    student_params = metrics.get("student_parameters") or pruned.student_num_parameters
    return {
        "steps": [_step_facts(step) for step in pruned.steps],
        "teacher_blocks": pruned.teacher_num_layers,
        "kept": list(pruned.kept_layer_indices or []),
        "removed": list(pruned.removed_layer_indices or []),
        "teacher_hidden_size": pruned.teacher_hidden_size,
        "student_hidden_size": pruned.student_hidden_size,
        "teacher_parameters": teacher_params,
        "student_parameters": student_params,
        "parameter_change": (
            (student_params - teacher_params) / teacher_params if teacher_params and student_params else None
        ),
        "data": pruned.data,
        "license": pruned.license,
        "mlp_rows": _mlp_rows(pruned),
        "attention_heads": _attention_heads_phrase(pruned),
    }


def _attention_heads_phrase(pruned: PrunedConfig) -> str | None:
    """`"4 → 2"` (or the per-block lists when blocks differ) when head pruning changed some block; else None."""
    student, teacher = pruned.student_attention_heads, pruned.teacher_attention_heads
    if not student or len(teacher) != pruned.teacher_num_layers:
        return None
    before = [teacher[t] for t in pruned.kept_layer_indices]
    if before == student:
        return None
    if len(set(before)) == 1 and len(set(student)) == 1:
        return f"{before[0]} → {student[0]} query heads in every block"
    return f"{before} → {student} query heads (per student block)"


def _step_facts(step: Mapping[str, Any]) -> dict[str, Any]:
    """A pruning step's values, each None where it says nothing worth a word."""
    layers = list(step.get("layers") or [])
    return {
        "type": step.get("type", "unknown"),
        "method": step.get("method") or None,
        "score": step.get("score") or None,
        "removed": step.get("removed") or None,
        "n_blocks": step["n_blocks"] if positive_number(step.get("n_blocks")) and step["n_blocks"] > 1 else None,
        "pruning_ratio": step.get("pruning_ratio"),
        "expansion_rate": step.get("expansion_rate"),
        "divisor": step["divisor"] if positive_number(step.get("divisor")) and step["divisor"] > 1 else None,
        # all blocks from 0 up: nothing worth saying
        "layers": layers if layers and layers != list(range(len(layers))) else None,
        "heal": _heal_facts(step.get("heal")),
        # anything else a future step records, when it reads as one short value
        "other": [
            (key, value)
            for key, value in step.items()
            if key not in _WORDED_STEP_KEYS and isinstance(value, bool | int | float | str)
        ],
    }


def _heal_facts(heal: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A healing record's values (`hf_recover.prune.healing`), each None where the record does not have it."""
    if not isinstance(heal, Mapping) or not heal.get("method"):
        return None
    perplexity = heal.get("calibration_perplexity") or {}
    return {
        "method": heal["method"],
        "spans": [list(span) for span in heal.get("spans") or []],
        "skipped": [list(span) for span in heal.get("skipped") or []],
        "fit_on": heal.get("fit_on"),
        "tokens": heal.get("calibration_tokens"),
        "steps": heal.get("steps"),
        "learning_rate": heal.get("learning_rate"),
        "perplexity_before": perplexity.get("before"),
        "perplexity_after": perplexity.get("after"),
        "measured": heal.get("measured"),
    }


def _mlp_rows(pruned: PrunedConfig) -> list[dict[str, Any]]:
    """One row per student block when width pruning changed some MLP size; else none."""
    student_sizes, teacher_sizes = pruned.student_intermediate_sizes, pruned.teacher_intermediate_sizes
    kept = pruned.kept_layer_indices
    if not student_sizes or len(student_sizes) != len(kept):
        return []
    teacher_for = [teacher_sizes[t] if len(teacher_sizes) == pruned.teacher_num_layers else None for t in kept]
    # a width step that pruned only heads or the hidden size records no MLP method
    mlp_pruned = any(step.get("type") == "width" and step.get("method") for step in pruned.steps)
    if not mlp_pruned and all(t is None or t == s for t, s in zip(teacher_for, student_sizes)):
        return []
    return [
        {
            "student": i,
            "teacher": t,
            "teacher_size": t_size,
            "student_size": s_size,
            "kept": s_size / t_size if t_size else None,
        }
        for i, (t, t_size, s_size) in enumerate(zip(kept, teacher_for, student_sizes))
    ]


def positive_number(value: Any) -> bool:
    """A number (not a bool) above 0."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0
