"""hf_recover's perplexity and recovery figures as `evaluate` metric modules, shipped inside the package.

They load offline (no Hub, also with `HF_HUB_OFFLINE=1`) from the paths these functions return:

    import evaluate
    from hf_recover.base.metrics import perplexity_metric_path, recovery_metric_path

    perplexity = evaluate.load(perplexity_metric_path())
    perplexity.add_batch(nll_sum=[...], tokens=[...])  # per sequence, e.g. from hf_recover.base.metrics.next_token_nll
    perplexity.compute()  # {"perplexity": ..., "nll": ..., "tokens": ...}, as hf_recover.evaluate_perplexity
    evaluate.load(recovery_metric_path()).compute(
        teacher_perplexity=[16.1], pruned_perplexity=[60.2], recovered_perplexity=[20.4]
    )  # {"recovery": ..., "retention": ..., "pruned_retention": ...}, as hf_recover.recovery_metrics

In a `transformers.Trainer`, pass `preprocess_logits_for_metrics=preprocess_logits_for_perplexity` (it keeps two
numbers per sequence instead of the (B, T, V) logits) and `compute_metrics=perplexity_compute_metrics()`;
`trainer.evaluate()` then reports `eval_perplexity`, `eval_nll` and `eval_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..evaluation import next_token_nll

__all__ = [
    "metric_info",
    "next_token_nll",
    "perplexity_compute_metrics",
    "perplexity_metric_path",
    "preprocess_logits_for_perplexity",
    "recovery_metric_path",
]

_HERE = Path(__file__).resolve().parent


def perplexity_metric_path() -> str:
    """The folder of the `hf_recover_perplexity` metric module, for `evaluate.load`."""
    return str(_HERE / "hf_recover_perplexity")


def recovery_metric_path() -> str:
    """The folder of the `hf_recover_recovery` metric module (recovery %, retention), for `evaluate.load`."""
    return str(_HERE / "hf_recover_recovery")


def metric_info(description: str, inputs_description: str, features: dict[str, str]):
    """The `evaluate.MetricInfo` of an hf_recover metric module: `features` maps each input to its value type."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        module_type="metric",
        description=description,
        citation="",
        inputs_description=inputs_description,
        features=datasets.Features({name: datasets.Value(kind) for name, kind in features.items()}),
    )


def preprocess_logits_for_perplexity(logits: Any, labels: Any):
    """For `Trainer(preprocess_logits_for_metrics=...)`: (B, T, V) logits -> (B, 2) rows `[nll_sum, tokens]`."""
    import torch

    if isinstance(logits, tuple | list):  # models that also return other outputs: the logits come first
        logits = logits[0]
    nll, tokens = next_token_nll(logits, labels)
    return torch.stack([nll, tokens.to(nll.dtype)], dim=-1)


def perplexity_compute_metrics(metric: Any = None) -> Callable[[Any], dict[str, float]]:
    """A `Trainer` `compute_metrics` that turns the `[nll_sum, tokens]` rows of `preprocess_logits_for_perplexity`
    into `{"perplexity", "nll", "tokens"}` with the `hf_recover_perplexity` metric (`metric`, or loaded here)."""
    if metric is None:
        import evaluate

        metric = evaluate.load(perplexity_metric_path())

    def compute_metrics(eval_prediction) -> dict[str, float]:
        rows = eval_prediction.predictions
        return metric.compute(nll_sum=rows[:, 0].tolist(), tokens=[round(t) for t in rows[:, 1].tolist()])

    return compute_metrics
