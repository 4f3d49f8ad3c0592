"""Healed width pruning: the least-squares refit of `down_proj` / `o_proj` columns against naive refits computed from
the activations themselves, and its properties."""

import pytest
import torch
from conftest import build_tiny_model

from hf_recover.base.anatomy import head_rows
from hf_recover.base.loading import load_pruned
from hf_recover.prune import prune_width
from hf_recover.prune.width_healing import refit_columns


def _rows(n=6, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r, ids in enumerate(torch.randint(3, 320, (n, length), generator=g).tolist()):
        pad = r % 3  # some rows end with padding, which must not count
        rows.append({"input_ids": ids, "attention_mask": [1] * (length - pad) + [0] * pad})
    return rows


def _inputs(model, rows, module_of):
    """The real-token inputs `(N, in)` of `module_of(block)` in every block, by hooks on the unpruned model."""
    seen = {i: [] for i in range(len(model.model.layers))}
    handles = []
    for i, block in enumerate(model.model.layers):
        handles.append(module_of(block).register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0])))
    with torch.no_grad():
        for row in rows:
            mask = torch.tensor([row["attention_mask"]])
            model(input_ids=torch.tensor([row["input_ids"]]), attention_mask=mask)
            for i in seen:
                seen[i][-1] = seen[i][-1][mask.bool()].double()
    for h in handles:
        h.remove()
    return {i: torch.cat(v) for i, v in seen.items()}


def _naive_refit(h, weight, keep, ridge):
    """Ridge least squares by stacking: [h_K; sqrt(λ)·I] W'ᵀ ≈ [h·Wᵀ; sqrt(λ)·W_Kᵀ], solved by torch.linalg.lstsq."""
    w = weight.double()
    h_k = h[:, keep]
    strength = ridge * float((h_k.T @ h_k).diagonal().mean())
    a = torch.cat([h_k, strength**0.5 * torch.eye(len(keep), dtype=torch.float64)])
    b = torch.cat([h @ w.T, strength**0.5 * w[:, keep].T])
    return torch.linalg.lstsq(a, b).solution.T


def test_refit_columns_is_the_ridge_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 12, generator=g)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    for ridge in (1e-9, 1e-2):
        got = refit_columns(weight, h.T @ h, keep, ridge=ridge)
        assert got.dtype == weight.dtype and got.shape == (5, 6)
        torch.testing.assert_close(got.double(), _naive_refit(h, weight, keep, ridge), rtol=1e-4, atol=1e-5)
    # the refit fits the layer's output better than the sliced columns, as least squares must
    sliced_error = (h @ weight.double().T - h[:, keep] @ weight.double()[:, keep].T).norm()
    refit = refit_columns(weight, h.T @ h, keep, ridge=1e-3).double()
    assert (h @ weight.double().T - h[:, keep] @ refit.T).norm() < sliced_error


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_healed_mlp_and_heads_equal_naive_refits(model_type):
    teacher = build_tiny_model(model_type)
    rows = _rows()
    downs = _inputs(teacher, rows, lambda block: block.mlp.down_proj)
    outs = _inputs(teacher, rows, lambda block: block.self_attn.o_proj)
    healed, config = prune_width(teacher, pruning_ratio=0.5, method="activation", heads=2, data=rows, heal="lstsq")
    plain, _ = prune_width(teacher, pruning_ratio=0.5, method="activation", heads=2, data=rows)
    step = config.steps[-1]
    assert step["heal"]["method"] == "lstsq" and step["heal"]["refitted"] == ["down_proj", "o_proj"]
    assert step["heal"]["calibration_tokens"] == sum(sum(r["attention_mask"]) for r in rows)
    head_size = teacher.config.hidden_size // teacher.config.num_attention_heads
    for i, (block, plain_block, old) in enumerate(zip(healed.model.layers, plain.model.layers, teacher.model.layers)):
        # which neurons/heads were kept: the plain pruning's columns are a subset of the teacher's, found by value
        keep = _kept_columns(old.mlp.down_proj.weight, plain_block.mlp.down_proj.weight)
        expected = _naive_refit(downs[i], old.mlp.down_proj.weight, keep, 1e-3)
        torch.testing.assert_close(block.mlp.down_proj.weight.double(), expected, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(block.mlp.gate_proj.weight, plain_block.mlp.gate_proj.weight)  # only down refits
        kept_heads = torch.tensor(step["kept_heads"][str(i)])
        columns = head_rows(kept_heads, head_size)
        expected = _naive_refit(outs[i], old.self_attn.o_proj.weight, columns, 1e-3)
        torch.testing.assert_close(block.self_attn.o_proj.weight.double(), expected, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(block.self_attn.q_proj.weight, plain_block.self_attn.q_proj.weight)


def _kept_columns(full: torch.Tensor, sliced: torch.Tensor) -> torch.Tensor:
    return torch.tensor([int((full - sliced[:, [j]]).abs().sum(0).argmin()) for j in range(sliced.shape[1])])


@pytest.mark.parametrize("hidden_method", ["slice", "rotate"])
def test_a_heal_with_a_hidden_cut_refits_before_it(hidden_method):
    """The refit solves for the unpruned output rows, so it runs before the hidden size is cut: sliced, the healed
    student's rows are those of the same heal without the hidden cut, at the channels kept."""
    teacher, rows = build_tiny_model(), _rows()
    kwargs = dict(pruning_ratio=0.5, heads=2, data=rows, heal="lstsq")
    both, config = prune_width(teacher, hidden_size=28, hidden_method=hidden_method, **kwargs)
    healed, _ = prune_width(teacher, **kwargs)
    heal = config.steps[-1]["heal"]
    assert heal["measured"] == "before the hidden-size cut" and heal["refitted"] == ["down_proj", "o_proj"]
    assert both.config.hidden_size == 28
    ids = torch.tensor([rows[0]["input_ids"]])
    assert torch.isfinite(both(input_ids=ids).logits).all()
    if hidden_method == "slice":
        for block, full in zip(both.model.layers, healed.model.layers):
            for name in ("mlp.down_proj", "self_attn.o_proj"):
                cut, whole = block.get_submodule(name).weight, full.get_submodule(name).weight
                # every row of the cut student is a row of the healed one (28 of its 32 channels)
                distance = torch.cdist(cut.double(), whole.double()).min(dim=1).values
                assert distance.max() < 1e-6, name


def test_a_healed_width_student_saves_reloads_and_generates(tmp_path):
    teacher = build_tiny_model()
    rows = _rows()
    student, config = prune_width(teacher, pruning_ratio=0.5, heads=2, layers=[1, 3], data=rows, heal="lstsq")
    before, after = (config.steps[-1]["heal"]["calibration_perplexity"][k] for k in ("before", "after"))
    assert before > 0 and after > 0
    student.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path)
    ids = torch.tensor([rows[0]["input_ids"][:8]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)
    assert reloaded.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 12)


def test_bad_heal_inputs_are_refused_before_any_work():
    teacher = build_tiny_model()
    with pytest.raises(ValueError, match="pass data="):
        prune_width(teacher, pruning_ratio=0.5, heal="lstsq")
    with pytest.raises(ValueError, match="width heal takes one of"):
        prune_width(teacher, pruning_ratio=0.5, heal="svd", data=_rows())
    # a hidden-size cut alone removes no column to refit: refused, not recorded as healed
    with pytest.raises(ValueError, match="heal='lstsq' .* hidden_size=16\\): nothing would be refitted"):
        prune_width(teacher, hidden_size=16, heal="lstsq", data=_rows())
