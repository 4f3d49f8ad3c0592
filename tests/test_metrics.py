"""hf_recover's `evaluate` metric modules: they load offline from inside the package, give the numbers of
hf_recover.evaluate_perplexity / recovery_metrics and of a hand computation, and work in a Trainer."""

import math
import os
import subprocess
import sys

import evaluate
import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_recover import evaluate_perplexity, recovery_metrics
from hf_recover.base.constants import IGNORE_INDEX
from hf_recover.base.metrics import (
    next_token_nll,
    perplexity_compute_metrics,
    perplexity_metric_path,
    preprocess_logits_for_perplexity,
    recovery_metric_path,
)


@pytest.fixture(scope="module")
def perplexity_metric():
    return evaluate.load(perplexity_metric_path())


@pytest.fixture(scope="module")
def recovery_metric():
    return evaluate.load(recovery_metric_path())


def _padded_rows(n_valid=(9, 5, 12, 3, 7), length=12):
    """Right-padded rows with masked labels, as prepare_recovery_dataset makes them."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for n in n_valid:
        ids = torch.randint(3, 320, (length,), generator=g).tolist()
        rows.append(
            {
                "input_ids": ids[:n] + [0] * (length - n),
                "attention_mask": [1] * n + [0] * (length - n),
                "labels": ids[:n] + [IGNORE_INDEX] * (length - n),
            }
        )
    return rows


def test_perplexity_by_hand(perplexity_metric):
    # sequences with NLL sums 2 and 4 nats over 1 and 2 tokens: mean 6 / 3 = 2 nats, perplexity e^2
    result = perplexity_metric.compute(nll_sum=[2.0, 4.0], tokens=[1, 2])
    assert result["nll"] == pytest.approx(2.0) and result["tokens"] == 3
    assert result["perplexity"] == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError, match="no valid next-token label"):
        perplexity_metric.compute(nll_sum=[0.0], tokens=[0])


def test_perplexity_metric_equals_evaluate_perplexity(tiny_llama, perplexity_metric):
    rows = _padded_rows()
    expected = evaluate_perplexity(tiny_llama, Dataset.from_list(rows), batch_size=2)
    with torch.no_grad():
        for start in range(0, len(rows), 2):  # logged batch by batch, as a user's loop would
            batch = {k: torch.tensor([r[k] for r in rows[start : start + 2]]) for k in rows[0]}
            logits = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, tokens = next_token_nll(logits, batch["labels"])
            perplexity_metric.add_batch(nll_sum=nll.tolist(), tokens=tokens.tolist())
    result = perplexity_metric.compute()
    assert result["tokens"] == expected["tokens"] == 8 + 4 + 11 + 2 + 6
    assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_nll_in_chunks_is_the_whole_batch_cross_entropy(monkeypatch, dtype):
    """Scored a few rows at a time (chunks of 3 positions here, the last one short) against the naive formula: each
    position's -log softmax at its next label, in float32, ignored labels skipped."""
    import hf_recover.base.evaluation as evaluation

    monkeypatch.setattr(evaluation, "NLL_CHUNK_ELEMENTS", 3 * 50)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 9, 50, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, 4], labels[1, 8] = IGNORE_INDEX, IGNORE_INDEX
    nll, tokens = next_token_nll(logits, labels)
    logp = logits.float().log_softmax(-1)
    want = [
        sum(-logp[b, t, labels[b, t + 1]].item() for t in range(8) if labels[b, t + 1] != IGNORE_INDEX)
        for b in range(2)
    ]
    assert nll.dtype == torch.float32 and tokens.tolist() == [7, 7]
    torch.testing.assert_close(nll, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_recovery_metric_equals_recovery_metrics_and_the_hand_value(recovery_metric):
    result = recovery_metric.compute(teacher_perplexity=[20.0], pruned_perplexity=[60.0], recovered_perplexity=[30.0])
    assert result["recovery"] == pytest.approx(0.75)  # (60 - 30) / (60 - 20)
    assert result == pytest.approx(recovery_metrics(20.0, 60.0, 30.0))
    odd = recovery_metric.compute(teacher_perplexity=[16.1], pruned_perplexity=[41.7], recovered_perplexity=[19.3])
    assert odd == pytest.approx(recovery_metrics(16.1, 41.7, 19.3))
    with pytest.raises(ValueError, match="one row"):
        recovery_metric.compute(teacher_perplexity=[1.0, 2.0], pruned_perplexity=[3, 4], recovered_perplexity=[2, 3])


def test_trainer_compute_metrics_reports_the_perplexity_of_evaluate_perplexity(tiny_llama, tmp_path):
    dataset = Dataset.from_list(_padded_rows())
    trainer = Trainer(
        model=tiny_llama,
        args=TrainingArguments(tmp_path, per_device_eval_batch_size=2, use_cpu=True, report_to="none"),
        eval_dataset=dataset,
        preprocess_logits_for_metrics=preprocess_logits_for_perplexity,
        compute_metrics=perplexity_compute_metrics(),
    )
    metrics = trainer.evaluate()
    expected = evaluate_perplexity(tiny_llama, dataset, batch_size=2)
    assert metrics["eval_tokens"] == expected["tokens"]
    assert metrics["eval_perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)


def test_the_metrics_load_offline_from_a_fresh_modules_cache(tmp_path):
    script = (
        "import evaluate\n"
        "from hf_recover.base.metrics import perplexity_metric_path, recovery_metric_path\n"
        "print(evaluate.load(perplexity_metric_path()).compute(nll_sum=[3.0], tokens=[2])['nll'])\n"
        "print(evaluate.load(recovery_metric_path()).compute(teacher_perplexity=[2.0], pruned_perplexity=[4.0], "
        "recovered_perplexity=[3.0])['recovery'])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1.5", "0.5"]
