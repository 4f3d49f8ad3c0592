"""The lm-eval bridge: `evaluate_lm_eval` on the offline task in examples/lm_eval_tasks, checked against a
loglikelihood computation written here independently of lm-eval; `capability_retention`."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from hf_recover.base.evaluation import capability_retention, evaluate_lm_eval

TASKS_DIR = Path(__file__).resolve().parents[1] / "examples" / "lm_eval_tasks"
TASK = "hf_recover_facts"

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs `pip install lm-eval`")


def _choice_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context): encode the whole text, score the tokens past the context's own encoding."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)  # (T, V)
    # the token at position i is predicted by the logits at position i - 1
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


def _reference_scores(model, tokenizer, limit: int | None = None) -> dict[str, float]:
    """Accuracy of argmax loglikelihood (`acc`) and of argmax loglikelihood per character (`acc_norm`)."""
    docs = [json.loads(line) for line in (TASKS_DIR / f"{TASK}.jsonl").read_text().splitlines()][:limit]
    hits, hits_norm = 0, 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        lls = [_choice_loglikelihood(model, tokenizer, context, " " + choice) for choice in doc["choices"]]
        hits += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
        per_char = [ll / len(choice) for ll, choice in zip(lls, doc["choices"])]
        hits_norm += max(range(len(lls)), key=per_char.__getitem__) == doc["answer"]
    return {"acc": hits / len(docs), "acc_norm": hits_norm / len(docs)}


@needs_lm_eval
def test_local_task_matches_manual_loglikelihood_accuracy(tiny_model_factory, tiny_tokenizer, monkeypatch, tmp_path):
    model = tiny_model_factory(seed=1)
    expected = _reference_scores(model, tiny_tokenizer, limit=8)
    assert 0 < expected["acc"] < 1, "the reference must be informative (neither all right nor all wrong)"

    model.train()
    monkeypatch.chdir(tmp_path)  # the task's data must be found from any working directory
    scores = evaluate_lm_eval(
        model, tiny_tokenizer, [TASK], include_path=str(TASKS_DIR), include_defaults=False, limit=8, batch_size=4
    )

    assert set(scores) == {TASK}
    metrics = scores[TASK]
    assert {"acc", "acc_norm", "acc_stderr"} <= set(metrics)
    assert all(isinstance(value, float) for value in metrics.values())
    assert 0.0 <= metrics["acc"] <= 1.0
    # limit=8 scored the first 8 questions only, exactly as the reference did
    assert metrics["acc"] == pytest.approx(expected["acc"])
    assert metrics["acc_norm"] == pytest.approx(expected["acc_norm"])
    assert model.training, "the model's train mode is restored"


@needs_lm_eval
def test_unknown_task_fails_before_running(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"Unknown lm-eval task.*hf_recover_fact"):
        evaluate_lm_eval(
            tiny_llama, tiny_tokenizer, ["hf_recover_fact"], include_path=TASKS_DIR, include_defaults=False
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tasks": []}, ValueError, "non-empty list of task names"),
        ({"limit": 0}, ValueError, "limit must be"),
        ({"limit": 1.5}, ValueError, "limit must be"),
        ({"batch_size": 0}, ValueError, "batch_size must be"),
        ({"num_fewshot": -1}, ValueError, "num_fewshot must be"),
        ({"include_path": "/no/such/folder"}, FileNotFoundError, "not a folder"),
    ],
)
def test_bad_arguments_fail_before_work(tiny_llama, tiny_tokenizer, kwargs, error, match):
    kwargs = {"tasks": [TASK], **kwargs}
    with pytest.raises(error, match=match):
        evaluate_lm_eval(tiny_llama, tiny_tokenizer, **kwargs)


def test_missing_lm_eval_says_how_to_install(tiny_llama, tiny_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install lm-eval.*after torch"):
        evaluate_lm_eval(tiny_llama, tiny_tokenizer, [TASK], include_path=TASKS_DIR)


def test_capability_retention_is_ratio_of_mean_accuracies():
    teacher = {"a": {"acc": 0.8, "acc_norm": 0.7}, "b": {"acc": 0.4}}
    student = {"a": {"acc": 0.5}, "b": {"acc": 0.4}}
    assert capability_retention(teacher, student) == pytest.approx((0.5 + 0.4) / (0.8 + 0.4))
    assert capability_retention(teacher, teacher) == pytest.approx(1.0)
    assert math.isnan(capability_retention({"a": {"acc": 0.0}}, {"a": {"acc": 0.3}}))


def test_capability_retention_rejects_mismatched_scores():
    with pytest.raises(ValueError, match="same tasks"):
        capability_retention({"a": {"acc": 0.5}}, {"b": {"acc": 0.5}})
    with pytest.raises(ValueError, match="acc_norm.*student:a"):
        capability_retention({"a": {"acc_norm": 0.5}}, {"a": {"acc": 0.5}}, metric="acc_norm")
