import math

import pytest
import torch
from datasets import Dataset

from hf_recover import evaluate_perplexity, recovery_metrics
from hf_recover.base.constants import IGNORE_INDEX


def _manual_nll(model, rows):
    """Sum and count of next-token negative log-likelihoods, one token at a time."""
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        logits = model(input_ids=ids, attention_mask=torch.tensor([row["attention_mask"]])).logits[0]
        for t in range(len(row["labels"]) - 1):
            target = row["labels"][t + 1]
            if target == IGNORE_INDEX:
                continue
            total -= torch.log_softmax(logits[t].double(), -1)[target].item()
            count += 1
    return total, count


def test_perplexity_equals_a_manual_token_by_token_computation(tiny_llama):
    g = torch.Generator().manual_seed(1)
    rows = []
    for n_valid in (9, 5, 12, 3):  # right padding with masked labels, as prepare_recovery_dataset makes
        ids = torch.randint(3, 320, (12,), generator=g).tolist()
        rows.append(
            {
                "input_ids": ids[:n_valid] + [0] * (12 - n_valid),
                "attention_mask": [1] * n_valid + [0] * (12 - n_valid),
                "labels": ids[:n_valid] + [IGNORE_INDEX] * (12 - n_valid),
            }
        )
    total, count = _manual_nll(tiny_llama, rows)
    result = evaluate_perplexity(tiny_llama, Dataset.from_list(rows), batch_size=3)
    assert result["tokens"] == count == 8 + 4 + 11 + 2
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_max_batches_and_training_mode_restored(tiny_llama):
    rows = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "labels": [5, 6, 7, 8]}] * 5
    tiny_llama.train()
    assert evaluate_perplexity(tiny_llama, rows, batch_size=2, max_batches=2)["tokens"] == 4 * 3
    assert tiny_llama.training


def test_perplexity_of_all_masked_data_is_an_error(tiny_llama):
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 0, 0], "labels": [5, IGNORE_INDEX, IGNORE_INDEX]}]
    with pytest.raises(ValueError, match="no valid next-token label"):
        evaluate_perplexity(tiny_llama, rows)


def test_recovery_metrics_by_hand():
    m = recovery_metrics(teacher_ppl=20.0, pruned_ppl=60.0, recovered_ppl=30.0)
    assert m["recovery"] == pytest.approx(0.75)  # (60 - 30) / (60 - 20)
    assert m["retention"] == pytest.approx(20 / 30)
    assert m["pruned_retention"] == pytest.approx(20 / 60)
    with pytest.raises(ValueError, match="pruned_ppl must be a positive"):
        recovery_metrics(20.0, 0.0, 30.0)


def test_recovery_curve_helpers_by_hand():
    from hf_recover.lab import curve_steps, tokens_to_reach

    assert curve_steps(60, 4) == [15, 30, 45, 60]
    assert curve_steps(2, 4) == [1, 2]  # no step twice, none before the first
    assert curve_steps(7, 1) == [7]
    with pytest.raises(ValueError, match="at least 1 point"):
        curve_steps(10, 0)
    curve = [(0, 10.0), (1024, 60.0), (2048, 55.0), (4096, 80.0)]
    assert tokens_to_reach(curve, 50.0) == 1024
    assert tokens_to_reach(curve, 60.0) == 1024  # reaching counts, not exceeding
    assert tokens_to_reach(curve, 70.0) == 4096
    assert tokens_to_reach(list(reversed(curve)), 70.0) == 4096  # order of the points does not matter
    assert tokens_to_reach(curve, 90.0) is None


def test_recovery_curve_callback_evaluates_at_its_steps_only(tiny_llama):
    from types import SimpleNamespace

    from hf_recover.lab import RecoveryCurve

    data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 2, "attention_mask": [[1] * 4] * 2,
                              "labels": [[1, 2, 3, 4]] * 2})  # fmt: skip
    curve = RecoveryCurve([2], {"validation": data})
    for step in (1, 2, 3):
        state = SimpleNamespace(global_step=step, num_input_tokens_seen=100 * step)
        curve.on_step_end(None, state, None, model=tiny_llama)
    assert list(curve.points) == [2] and curve.tokens == {2: 200}
    assert curve.points[2]["validation"] == pytest.approx(evaluate_perplexity(tiny_llama, data)["perplexity"])
