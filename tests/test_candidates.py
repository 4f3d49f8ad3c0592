"""select_candidate: metrics equal independent computations, ranking, the teacher stays intact,
and a bad spec raises before anything is built."""

import json

import pytest
import torch
import torch.nn.functional as F

from hf_recover.base.evaluation import evaluate_perplexity
from hf_recover.prune import CandidateReport, prune_depth, prune_width, select_candidate
from hf_recover.prune import importance as importance_module
from hf_recover.prune.spec import PruneSpec


def _rows(n_rows=4, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r, ids in enumerate(torch.randint(3, 320, (n_rows, length), generator=g).tolist()):
        n_pad = r  # row r ends with r padding tokens
        mask = [1] * (length - n_pad) + [0] * n_pad
        labels = ids[: length - n_pad] + [-100] * n_pad
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def _naive_kl(teacher, student, rows):
    """Mean KL(teacher || student) over valid next-token positions, sequence by sequence."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            n = sum(row["attention_mask"])
            ids = torch.tensor([row["input_ids"][:n]])
            log_p = F.log_softmax(teacher(ids).logits[0, :-1].double(), -1)
            log_q = F.log_softmax(student(ids).logits[0, :-1].double(), -1)
            total += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
            count += n - 1
    return total / count


SPECS = [
    {"depth": {"method": "importance", "n": 2}},
    {"depth": {"method": "last", "n": 2}},
    {"depth": {"remove": [1, 2]}},
    {"width": {"pruning_ratio": 0.5, "method": "vow"}},
    {"depth": {"remove": [0]}, "width": {"expansion_rate": 1.0, "method": "activation"}},
]


def test_metrics_equal_independent_computations(tiny_llama):
    rows = _rows()
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    report = select_candidate(tiny_llama, SPECS, rows, batch_size=3)
    assert isinstance(report, CandidateReport)
    assert len(report.results) == 5
    assert report.tokens == sum(sum(r["attention_mask"]) - 1 for r in rows)
    ppls = [r.perplexity for r in report.results]
    assert ppls == sorted(ppls)
    assert report.teacher_perplexity == pytest.approx(evaluate_perplexity(tiny_llama, rows)["perplexity"], rel=1e-5)

    by_name = {r.name: r for r in report.results}
    manual, _ = prune_depth(tiny_llama, remove=[1, 2])
    result = by_name["remove:1,2"]
    assert result.perplexity == pytest.approx(evaluate_perplexity(manual, rows)["perplexity"], rel=1e-5)
    assert result.kl == pytest.approx(_naive_kl(tiny_llama, manual, rows), rel=1e-4, abs=1e-7)
    assert result.num_layers == 4
    assert result.pruned_config.removed_layer_indices == [1, 2]

    narrow, _ = prune_width(tiny_llama, pruning_ratio=0.5, method="vow")
    result = by_name["width:vow:0.5"]
    assert result.kl == pytest.approx(_naive_kl(tiny_llama, narrow, rows), rel=1e-4, abs=1e-7)
    assert result.pruned_config.student_intermediate_sizes == [32] * 6

    combined = by_name[
        '{"depth": {"remove": [0]}, "width": {"expansion_rate": 1.0, "method": "activation"}}'
    ].pruned_config
    assert combined.kept_layer_indices == [1, 2, 3, 4, 5]
    assert combined.student_intermediate_sizes == [32] * 5
    assert combined.pruning_types == ["depth", "width"]

    # the teacher is unchanged, and the best model does not share its tensors
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    best = report.best
    assert best is report.results[0] and best.model is not None
    assert all(r.model is None for r in report.results[1:])
    teacher_ptrs = {p.data_ptr() for p in tiny_llama.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for p in best.model.parameters()}
    assert best.model.pruned_config == best.pruned_config
    assert evaluate_perplexity(best.model, rows)["perplexity"] == pytest.approx(best.perplexity, rel=1e-5)


def test_importance_candidates_share_one_scoring(tiny_llama, monkeypatch):
    calls = []
    original = importance_module._block_scores
    monkeypatch.setattr(importance_module, "_block_scores", lambda *a, **k: calls.append(k) or original(*a, **k))
    rows = _rows()
    report = select_candidate(
        tiny_llama, {"one": {"depth": {"n": 1}}, "three": {"depth": {"n": 3}}}, rows, calibration_data=rows[:2]
    )
    assert len(calls) == 1
    scores = json.loads(report.to_json())["block_scores"]["block_influence:n_blocks=1"]
    order = sorted(range(6), key=lambda i: scores[i])
    three = next(r for r in report.results if r.name == "three")
    assert three.pruned_config.removed_layer_indices == sorted(order[:3])


def test_rank_by_kl_and_table_formats(tiny_llama):
    report = select_candidate(tiny_llama, SPECS[:3], _rows(), rank_by="kl")
    kls = [r.kl for r in report.results]
    assert kls == sorted(kls)
    text = str(report)
    assert "ranked by kl" in text
    for r in report.results:
        assert r.name in text
    markdown = report.to_markdown()
    assert markdown.splitlines()[1].startswith("|---")
    assert len([line for line in markdown.splitlines() if line.startswith("| ")]) == 4  # header + 3 rows
    payload = json.loads(report.to_json())
    assert [c["name"] for c in payload["candidates"]] == [r.name for r in report.results]
    assert payload["candidates"][0]["kl"] == report.best.kl


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"depht": {"n": 2}}, r"a dict with keys 'depth' and/or 'width'; got \{'depht'"),
        ({"depth": {"n": 2, "blocks": [1]}}, r"'depth' has unknown key\(s\) \['blocks'\]; its keys are"),
        ({"width": {"ratio": 0.5}}, r"'width' has unknown key\(s\) \['ratio'\]; its keys are"),
        ({"depth": {"n": 6, "method": "last"}}, "n must be"),
        ({"depth": {"remove": [9]}}, "outside"),
        ({"depth": {"n": 2, "method": "cosine"}}, "method must be one of"),
        ({"width": {"pruning_ratio": 1.5}}, r"\(0, 1\)"),
        ({"width": {"pruning_ratio": 0.5, "method": "l2"}}, "method must be one of"),
        ({"depth": {"n": 2}, "width": {"pruning_ratio": 0.5, "layers": [4]}}, "outside"),
        ({}, "A prune spec is a dict"),
    ],
)
def test_bad_spec_raises_before_building(tiny_llama, monkeypatch, spec, match):
    monkeypatch.setattr(PruneSpec, "build", lambda *a, **k: pytest.fail("a candidate was built"))
    with pytest.raises(ValueError, match=match):
        select_candidate(tiny_llama, [{"depth": {"n": 1, "method": "last"}}, spec], _rows())


def test_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="rank_by"):
        select_candidate(tiny_llama, SPECS, _rows(), rank_by="accuracy")
    with pytest.raises(ValueError, match="empty"):
        select_candidate(tiny_llama, [], _rows())
