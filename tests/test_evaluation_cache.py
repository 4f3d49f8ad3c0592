"""Perplexities of the same weights on the same tokens are measured once, then read from the cache."""

import pytest
import torch
from conftest import build_tiny_model
from datasets import Dataset

import hf_recover.distill.evaluation_cache as evaluation_cache
from hf_recover.base.data import prepare_recovery_dataset
from hf_recover.base.evaluation import evaluate_perplexity
from hf_recover.distill.evaluation_cache import evaluate_splits


@pytest.fixture
def splits(tiny_tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog. " * 8, "A river runs through the green valley. " * 8]
    data = prepare_recovery_dataset(Dataset.from_dict({"text": texts}), tiny_tokenizer, max_length=16)
    return {"validation": data.select(range(3)), "ood": data.select(range(3, 6))}


def test_a_second_evaluation_of_the_same_weights_reads_the_cache(splits, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_RECOVER_CACHE", str(tmp_path))
    teacher, cut = build_tiny_model(seed=0), build_tiny_model(seed=1)
    first = evaluate_splits({"teacher": teacher, "cut": cut}, splits, cache=True)
    for split, data in splits.items():  # the values are the plain evaluation's
        assert first[split]["teacher"] == evaluate_perplexity(teacher, data)["perplexity"]

    def measured(*args, **kwargs):
        pytest.fail("measured again")

    monkeypatch.setattr(evaluation_cache, "evaluate_perplexity", measured)
    assert evaluate_splits({"teacher": teacher, "cut": cut}, splits, cache=True) == first
    assert "teacher: perplexity on validation, ood read from the cache" in capsys.readouterr().out

    # other weights, other tokens or other settings are measured, not read
    with torch.no_grad():
        cut.lm_head.weight.mul_(1.5)
    for models, data, kwargs in (
        ({"cut": cut}, splits, {}),
        ({"teacher": teacher}, {"v": splits["validation"].select(range(2))}, {}),
        ({"teacher": teacher}, splits, {"batch_size": 2}),
    ):
        with pytest.raises(pytest.fail.Exception, match="measured again"):
            evaluate_splits(models, data, cache=True, **kwargs)


def test_a_damaged_entry_is_measured_again(splits, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_RECOVER_CACHE", str(tmp_path))
    model = build_tiny_model(seed=0)
    value, hit = evaluation_cache.cached_perplexity(model, splits["validation"])
    assert not hit
    (entry,) = (tmp_path / evaluation_cache.FOLDER).glob("*.json")
    entry.write_text("{not json")
    assert evaluation_cache.cached_perplexity(model, splits["validation"]) == (value, False)
    assert evaluation_cache.cached_perplexity(model, splits["validation"]) == (value, True)


def test_the_same_weights_under_another_configuration_are_measured_again(splits, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_RECOVER_CACHE", str(tmp_path))
    model = build_tiny_model(seed=0)
    evaluation_cache.cached_perplexity(model, splits["validation"])
    model.config.rope_theta = 1234.0  # not in the state dict: the rotary frequencies are computed from it
    assert evaluation_cache.model_fingerprint(model) != evaluation_cache.model_fingerprint(build_tiny_model(seed=0))
    assert not evaluation_cache.cached_perplexity(model, splits["validation"])[1]
