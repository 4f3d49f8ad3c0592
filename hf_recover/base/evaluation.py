"""Measure recovery: perplexity, recovery % and retention."""

from __future__ import annotations

import difflib
import inspect
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .constants import IGNORE_INDEX
from .data import iter_batches, num_batches

NLL_CHUNK_ELEMENTS = 2**22
"""`next_token_nll` upcasts and scores this many logits at a time (16 MiB in float32): below the size at which
glibc maps every fresh block anew (32 MiB), so its temporaries are recycled instead of page-faulted in again."""


def evaluate_perplexity(
    model: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    desc: str = "Perplexity",
) -> dict[str, float]:
    """Token-weighted perplexity of a causal LM over the valid next-token labels of `dataset`.

    `dataset` is prepared by `prepare_recovery_dataset` (or is a DataLoader of such batches). Position
    `t` is scored against label `t + 1`; labels equal to -100 are skipped. Returns `perplexity`
    (`exp(nll)`), `nll` (mean negative log-likelihood in nats) and `tokens` (how many were scored).
    The same figures come from the `evaluate` metric `hf_recover.base.metrics.perplexity_metric_path()` fed with
    `next_token_nll` of each batch (in a `Trainer`'s `compute_metrics`, for instance).
    """
    return score_models({"model": model}, dataset, batch_size=batch_size, max_batches=max_batches, desc=desc)["model"]


def evaluate_splits(
    models: dict[str, torch.nn.Module],
    splits: dict[str, Any],
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> dict[str, dict[str, float]]:
    """Perplexity of every model on every prepared split: `{split: {model_name: ppl}}`. (Read from hf_recover's
    cache when measured before: `hf_recover.distill.evaluation_cache.evaluate_splits(..., cache=True)`.)"""
    figures: dict[str, dict[str, float]] = {split: {} for split in splits}
    for name, model in models.items():
        for split, data in splits.items():
            figures[split][name] = evaluate_perplexity(
                model, data, batch_size=batch_size, max_batches=max_batches, desc=f"{name}/{split}"
            )["perplexity"]
    return figures


@torch.inference_mode()
def score_models(
    models: Mapping[str, torch.nn.Module],
    dataset: Any,
    *,
    reference: str | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    desc: str = "Perplexity",
) -> dict[str, dict[str, float]]:
    """The one evaluation loop: every model's perplexity on the same batches, and its KL to a reference.

    Returns `{name: {"perplexity", "nll", "tokens"}}`; with `reference` (one of the names, e.g. the teacher),
    every other model also gets `"kl"`, the mean forward KL(reference ‖ model) per valid token, from the
    reference's logits computed once per batch. Scoring follows `evaluate_perplexity`; training modes are
    restored afterwards.
    """
    from .losses import forward_kl

    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {sorted(models)}.")
    order = sorted(models, key=lambda name: name != reference)  # the reference first: its logits are shared
    device = next(models[order[0]].parameters()).device
    modes = {name: model.training for name, model in models.items()}
    nll, kl, tokens = dict.fromkeys(models, 0.0), dict.fromkeys(models, 0.0), 0
    try:
        for model in models.values():
            model.eval()
        batches = iter_batches(dataset, batch_size=batch_size, max_batches=max_batches, device=device)
        total = num_batches(dataset, batch_size=batch_size, max_batches=max_batches)
        for batch in tqdm(batches, total=total, desc=desc, leave=False):
            labels = batch.get("labels", batch["input_ids"])
            if "attention_mask" in batch and "labels" not in batch:
                labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            reference_logits = None
            for name in order:
                logits = models[name](input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
                sequence_nll, sequence_tokens = next_token_nll(logits, labels)
                nll[name] += sequence_nll.sum().item()
                if name == reference:
                    reference_logits = logits
                elif reference_logits is not None:  # summed over valid tokens: num_items_in_batch=1
                    kl[name] += forward_kl(logits, reference_logits, labels, num_items_in_batch=1).item()
                del logits
            tokens += int(sequence_tokens.sum())
    finally:
        for name, model in models.items():
            model.train(modes[name])
    scores = {name: perplexity_from_totals(nll[name], tokens) for name in models}
    for name in models:
        if reference is not None and name != reference:
            scores[name]["kl"] = kl[name] / tokens
    return scores


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed negative log-likelihood (nats, float32) of its next-token labels, and their count.

    `logits` (B, T, V) and `labels` (B, T), not shifted: position `t` is scored against label `t + 1`, and labels
    equal to -100 are skipped. Returns two (B,) tensors, `nll_sum` and `tokens`.
    """
    # (B, T, V) -> predictions for positions 0..T-2 against labels 1..T-1, a few float32 rows at a time: whole
    # float32 copies of a batch's logits (and their log-softmax) would each be several times the logits' own memory
    shift_labels = labels[:, 1:]
    nll = torch.empty(shift_labels.shape, dtype=torch.float32, device=logits.device)
    step = max(1, NLL_CHUNK_ELEMENTS // logits.size(-1))
    for row in range(logits.size(0)):
        for start in range(0, shift_labels.size(1), step):
            scored = slice(start, min(start + step, shift_labels.size(1)))
            nll[row, scored] = F.cross_entropy(
                logits[row, scored].float(), shift_labels[row, scored], ignore_index=IGNORE_INDEX, reduction="none"
            )
    return nll.sum(dim=1), (shift_labels != IGNORE_INDEX).sum(dim=1)


def perplexity_from_totals(total_nll: float, total_tokens: int) -> dict[str, float]:
    """`perplexity = exp(total_nll / total_tokens)` (inf past float range), with `nll` (the mean) and `tokens`.

    Token-weighted, so sums over any split of the data into batches or sequences give the same figure.
    """
    if total_tokens == 0:
        raise ValueError("The dataset has no valid next-token label (all labels are -100): nothing to score.")
    nll = total_nll / total_tokens
    return {"perplexity": math.exp(nll) if nll < 700 else math.inf, "nll": nll, "tokens": int(total_tokens)}


def recovery_metrics(teacher_ppl: float, pruned_ppl: float, recovered_ppl: float) -> dict[str, float]:
    """Recovery and retention from three perplexities (teacher, pruned student, recovered student).

    `recovery = (PPL_pruned - PPL_recovered) / (PPL_pruned - PPL_teacher)`: the fraction of the perplexity gap
    that pruning opened and recovery closed (1.0 = back to the teacher; it may exceed 1 or go negative, and is
    NaN when pruning opened no gap). `retention = PPL_teacher / PPL_recovered` and
    `pruned_retention = PPL_teacher / PPL_pruned`: the share of the teacher's quality kept, as a ratio of
    perplexities (1.0 = as good as the teacher). The `evaluate` metric `hf_recover.base.metrics.recovery_metric_path()`
    computes the same figures.
    """
    for name, value in (("teacher_ppl", teacher_ppl), ("pruned_ppl", pruned_ppl), ("recovered_ppl", recovered_ppl)):
        if not value > 0:
            raise ValueError(f"{name} must be a positive perplexity, got {value}.")
    gap = pruned_ppl - teacher_ppl
    return {
        "recovery": (pruned_ppl - recovered_ppl) / gap if gap != 0 else float("nan"),
        "retention": teacher_ppl / recovered_ppl,
        "pruned_retention": teacher_ppl / pruned_ppl,
    }


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of `model`, counting tied weights once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# -- lm-eval bridge: capability benchmarks on an in-memory model ------------------------------------------------

LM_EVAL_INSTALL_HINT = (
    "`pip install lm-eval` (after torch: lm-eval's own requirements do not include torch, so pip keeps the torch "
    "build you installed; avoid the `lm-eval[hf]` extra on a machine without torch, it would pull PyPI's default one)"
)


def evaluate_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | list[str],
    *,
    include_path: str | os.PathLike | list[str | os.PathLike] | None = None,
    include_defaults: bool = True,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness `tasks` on an in-memory causal LM; return `{task: {metric: value}}`.

    The model is wrapped by `lm_eval.models.huggingface.HFLM` (no reload from disk) and evaluated with
    `lm_eval.simple_evaluate`. `include_path` adds folders of local task YAMLs (e.g. `examples/lm_eval_tasks`,
    which holds an offline multiple-choice task, `hf_recover_facts`); `include_defaults=False` skips indexing
    lm-eval's thousands of built-in tasks (about 15 s on 2 cores) when only local tasks are run. `limit` caps the
    documents per task (an int, or a fraction in (0, 1]); use it for smoke runs only, scores on a subset are noisy.

    Metrics are keyed by name (`acc`, `acc_norm`, `acc_stderr`, ...); a metric computed after an lm-eval filter
    other than `none` keeps its filter, as `"exact_match,strict-match"`. Needs `lm-eval` (see
    `LM_EVAL_INSTALL_HINT`). The model's train/eval mode is restored afterwards.
    """
    task_names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not task_names or not all(isinstance(t, str) and t for t in task_names):
        raise ValueError(f"tasks must be a task name or a non-empty list of task names, got {tasks!r}.")
    if tokenizer is None:
        raise ValueError("evaluate_lm_eval needs the model's tokenizer (lm-eval tokenizes prompts and answers).")
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if num_fewshot is not None and (type(num_fewshot) is not int or num_fewshot < 0):
        raise ValueError(f"num_fewshot must be None or an int >= 0, got {num_fewshot!r}.")
    if limit is not None and not (
        (type(limit) is int and limit >= 1) or (isinstance(limit, float) and 0.0 < limit <= 1.0)
    ):
        raise ValueError(f"limit must be None, an int >= 1 (documents per task) or a float in (0, 1], got {limit!r}.")
    include_paths = [] if include_path is None else include_path if isinstance(include_path, list) else [include_path]
    for path in include_paths:
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"include_path {str(path)!r} is not a folder: give a folder of lm-eval task YAMLs."
            )

    lm_eval, HFLM, TaskManager = _import_lm_eval()
    manager_kwargs = {"include_path": [str(p) for p in include_paths] or None}
    if not include_defaults and "include_defaults" in inspect.signature(TaskManager).parameters:
        manager_kwargs["include_defaults"] = False  # older lm-eval always indexes its built-in tasks: only slower
    task_manager = TaskManager(**manager_kwargs)
    unknown = [name for name in task_names if name not in task_manager.all_tasks and not os.path.isfile(name)]
    if unknown:
        hints = {name: difflib.get_close_matches(name, task_manager.all_tasks, n=3) for name in unknown}
        raise ValueError(
            f"Unknown lm-eval task(s) {unknown} (close matches: {hints}). Check the names, or pass include_path= "
            "with the folder of your task YAMLs" + ("" if include_defaults else " (built-in tasks are excluded)") + "."
        )

    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        settings = {"num_fewshot": num_fewshot, "limit": limit, "task_manager": task_manager, "log_samples": False}
        output = lm_eval.simple_evaluate(model=lm, tasks=task_names, **settings)
    finally:
        model.train(was_training)
    return _lm_eval_scores(output["results"])


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"Running lm-eval tasks needs the lm-eval package: {LM_EVAL_INSTALL_HINT}.") from err
    return lm_eval, HFLM, TaskManager


def _lm_eval_scores(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """`{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...}` per task -> `{"acc": 0.5}`: numbers only."""
    scores = {}
    for task, values in results.items():
        metrics = {}
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # name, alias, sample_len, and stderrs reported as "N/A"
            metric, _, filter_name = key.partition(",")
            metrics[metric if filter_name == "none" else key] = float(value)
        scores[task] = metrics
    return scores


def capability_retention(
    teacher_scores: dict[str, dict[str, float]], student_scores: dict[str, dict[str, float]], *, metric: str = "acc"
) -> float:
    """Capability retention: `mean acc_student / mean acc_teacher`, the means over the same tasks.

    Both arguments are outputs of `evaluate_lm_eval` on the same tasks. Returns NaN when the teacher's mean is 0.
    """
    if not teacher_scores or set(teacher_scores) != set(student_scores):
        raise ValueError(
            f"Compare the same tasks: the teacher was scored on {sorted(teacher_scores)}, the student on "
            f"{sorted(student_scores)}."
        )
    missing = [
        f"{who}:{task}"
        for who, scores in (("teacher", teacher_scores), ("student", student_scores))
        for task, metrics in scores.items()
        if metric not in metrics
    ]
    if missing:
        raise ValueError(f"Metric {metric!r} is missing for {missing}; pick a metric every task reports.")
    teacher_mean = sum(teacher_scores[t][metric] for t in teacher_scores) / len(teacher_scores)
    student_mean = sum(student_scores[t][metric] for t in teacher_scores) / len(teacher_scores)
    return student_mean / teacher_mean if teacher_mean != 0 else float("nan")
