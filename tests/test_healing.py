"""Training-free healing of depth cuts: the fitted map is the least-squares one, folding it into down_proj
equals applying it after the MLP, it lowers the calibration residual, and the healed model generates,
saves and reloads like any pruned model."""

import pytest
import torch
from conftest import build_tiny_model

import hf_recover
from hf_recover.base.pruned_config import PrunedConfig
from hf_recover.prune import healing, prune_depth
from hf_recover.prune.healing import (
    HealSpec,
    cosine_distance,
    fit_cosine,
    fit_lstsq,
    fold_into_down_proj,
    healable_spans,
    removed_spans,
)

HEALABLE = ("llama", "qwen2", "qwen3", "mistral")  # Gemma3's post-feedforward norm is refused (see below)


def _rows(n_rows=8, length=20, seed=0, pad=0):
    """Calibration rows; the last `pad` positions of each are padding (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (n_rows, length), generator=g)
    mask = [1] * (length - pad) + [0] * pad
    return [{"input_ids": r, "attention_mask": mask, "labels": r} for r in ids.tolist()]


def _block_outputs(model, data, blocks):
    """Each block's output over the real tokens of `data` (rows with equal masks), stacked."""
    ids = torch.tensor([r["input_ids"] for r in data])
    mask = torch.tensor([r["attention_mask"] for r in data])
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # hidden_states[k + 1] is block k's output, except the last one (after the final norm)
    return {b: out.hidden_states[b + 1][mask.bool()] for b in blocks}


def test_spans():
    assert removed_spans([5, 1, 2, 9, 3]) == [(1, 3), (5, 5), (9, 9)]
    # kept 0, 4, 6, 7 of 10: runs 1-3 (after 0), 5 (after 4), 8-9 (after 7, to the end)
    assert healable_spans([0, 4, 6, 7], 10) == ([(0, 3), (4, 5), (7, 9)], [])
    assert healable_spans([2, 3], 5) == ([(3, 4)], [[0, 1]])  # a run from block 0 has no block before it


def test_lstsq_matches_a_naive_solver_and_is_stationary():
    g = torch.Generator().manual_seed(0)
    m, d = torch.randn(200, 6, generator=g), torch.randn(200, 6, generator=g)
    reference = torch.linalg.lstsq(m.double(), d.double()).solution
    torch.testing.assert_close(fit_lstsq(m, d, ridge=0.0), reference, rtol=1e-9, atol=1e-9)
    # with the ridge towards I: the gradient M^T(MT - D) + lambda (T - I) vanishes
    t = fit_lstsq(m, d, ridge=0.1)
    strength = 0.1 * float((m.double() ** 2).sum(0).mean())
    gradient = m.double().T @ (m.double() @ t - d.double()) + strength * (t - torch.eye(6, dtype=torch.float64))
    assert gradient.abs().max() < 1e-8
    # the ridge pulls towards the identity: a direction the data never uses keeps its identity row
    m[:, 2] = 0
    torch.testing.assert_close(fit_lstsq(m, d)[2], torch.eye(6, dtype=torch.float64)[2])


def test_cosine_fit_lowers_the_cosine_distance():
    g = torch.Generator().manual_seed(0)
    m, rest = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    wanted = rest + torch.tanh(m @ torch.randn(8, 8, generator=g))  # not linear: lstsq is not the cosine optimum
    start = fit_lstsq(m, wanted - rest)
    before = cosine_distance(rest + m @ start.float(), wanted)
    after = cosine_distance(rest + m @ fit_cosine(m, rest, wanted, start).float(), wanted)
    assert after < before - 1e-4


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma3_text", "mistral"])
def test_folding_equals_the_map_applied_after_the_mlp(model_type):
    model = build_tiny_model(model_type)
    pruned, _ = prune_depth(model, remove=[2, 3])
    transform = torch.eye(32) + 0.1 * torch.randn(32, 32)
    healed, _ = prune_depth(model, remove=[2, 3])
    shared_before = pruned.model.layers[1].mlp.down_proj.weight.clone()
    fold_into_down_proj(healed.model.layers[1].mlp, transform)
    assert torch.equal(pruned.model.layers[1].mlp.down_proj.weight, shared_before)
    hook = pruned.model.layers[1].mlp.register_forward_hook(lambda module, args, output: output @ transform)
    ids = torch.randint(3, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(healed(ids).logits, pruned(ids).logits, rtol=1e-4, atol=1e-4)
    hook.remove()
    assert type(healed) is type(model)
    assert sum(p.numel() for p in healed.parameters()) == sum(p.numel() for p in pruned.parameters())


@pytest.mark.parametrize("model_type", HEALABLE)
@pytest.mark.parametrize("method", ["lstsq", "cosine"])
def test_healed_model_is_the_pruned_one_with_the_fitted_maps(model_type, method, monkeypatch):
    model = build_tiny_model(model_type)
    data = _rows()
    folded = []
    original_fold = healing.fold_into_down_proj

    def record(mlp, transform):
        folded.append(transform)
        original_fold(mlp, transform)

    monkeypatch.setattr(healing, "fold_into_down_proj", record)
    healed, config = prune_depth(model, remove=[2, 3, 5], data=data, heal=method)
    plain, _ = prune_depth(model, remove=[2, 3, 5])
    # runs 2-3 (after block 1, student block 1) and 5 (after block 4, student block 2)
    assert config.steps[-1]["heal"]["spans"] == [[1, 3], [4, 5]]
    assert len(folded) == 2
    hooks = [
        plain.model.layers[b].mlp.register_forward_hook(lambda m, a, out, t=t: out @ t.float())
        for b, t in zip([1, 2], folded, strict=True)
    ]
    ids = torch.randint(3, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(healed(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("model_type", HEALABLE)
@pytest.mark.parametrize("method", ["lstsq", "cosine"])
def test_healing_lowers_the_calibration_residual(model_type, method):
    model = build_tiny_model(model_type)
    data = _rows(n_rows=12)
    plain, _ = prune_depth(model, remove=[2, 3])
    healed, _ = prune_depth(model, remove=[2, 3], data=data, heal=method)
    target = _block_outputs(model, data, [3])[3]  # the teacher's output after the removed run
    plain_out = _block_outputs(plain, data, [1])[1]  # student block 1 = teacher block 1, before the run
    healed_out = _block_outputs(healed, data, [1])[1]
    if method == "lstsq":
        assert (healed_out - target).norm() < 0.97 * (plain_out - target).norm()
    else:
        assert cosine_distance(healed_out, target) < 0.97 * cosine_distance(plain_out, target)


def test_sequential_fit_equals_the_teacher_fit_for_the_first_cut_only(tiny_llama):
    data = _rows()
    seq, _ = prune_depth(tiny_llama, remove=[2, 4], data=data, heal="lstsq")
    teacher_fit, config = prune_depth(tiny_llama, remove=[2, 4], data=data, heal=HealSpec("lstsq", sequential=False))
    with pytest.warns(DeprecationWarning, match="heal_sequential"):  # the same setting, by its deprecated name
        old, _ = prune_depth(tiny_llama, remove=[2, 4], data=data, heal="lstsq", heal_sequential=False)
    for block in (1, 2):
        torch.testing.assert_close(
            old.model.layers[block].mlp.down_proj.weight, teacher_fit.model.layers[block].mlp.down_proj.weight
        )
    # blocks before the first cut are the teacher's: the same activations, the same map
    torch.testing.assert_close(
        seq.model.layers[1].mlp.down_proj.weight, teacher_fit.model.layers[1].mlp.down_proj.weight
    )
    # the second fit sees the first healed cut in the student, not the teacher's block 2
    assert not torch.allclose(
        seq.model.layers[2].mlp.down_proj.weight, teacher_fit.model.layers[2].mlp.down_proj.weight, atol=1e-4
    )
    assert config.steps[-1]["heal"]["fit_on"] == "teacher"


def test_padding_is_excluded(tiny_llama):
    padded = _rows(n_rows=6, length=24, pad=6)
    unpadded = [{k: v[:18] for k, v in row.items()} for row in padded]
    a, ca = prune_depth(tiny_llama, remove=[3], data=padded, heal="lstsq", batch_size=6)
    b, cb = prune_depth(tiny_llama, remove=[3], data=unpadded, heal="lstsq", batch_size=6)
    torch.testing.assert_close(a.model.layers[2].mlp.down_proj.weight, b.model.layers[2].mlp.down_proj.weight)
    assert ca.steps[-1]["heal"]["calibration_tokens"] == cb.steps[-1]["heal"]["calibration_tokens"] == 6 * 18


def test_run_from_block_zero_is_skipped_and_recorded(tiny_llama):
    healed, config = prune_depth(tiny_llama, remove=[0, 1, 4], data=_rows(), heal="lstsq")
    plain, _ = prune_depth(tiny_llama, remove=[0, 1, 4])
    record = config.steps[-1]["heal"]
    assert record["spans"] == [[3, 4]] and record["skipped"] == [[0, 1]]
    assert record["method"] == "lstsq" and record["fit_on"] == "student" and record["calibration_tokens"] == 160
    assert torch.equal(healed.model.layers[0].mlp.down_proj.weight, plain.model.layers[0].mlp.down_proj.weight)
    assert not torch.equal(healed.model.layers[1].mlp.down_proj.weight, plain.model.layers[1].mlp.down_proj.weight)


@pytest.mark.parametrize("method", ["lstsq", "local"])
def test_a_cut_with_only_a_run_from_block_zero_heals_nothing(tiny_llama, method):
    healed, config = prune_depth(tiny_llama, remove=[0, 1], data=_rows(), heal=method)
    plain, _ = prune_depth(tiny_llama, remove=[0, 1])
    record = config.steps[-1]["heal"]
    assert record["spans"] == [] and record["skipped"] == [[0, 1]] and record["calibration_tokens"] == 0
    for a, b in zip(healed.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_scored_method_with_healing_records_both(tiny_llama):
    healed, config = prune_depth(tiny_llama, n=2, method="importance", data=_rows(), heal="cosine")
    step = config.steps[-1]
    assert step["method"] == "importance" and len(step["removed"]) == 2 and step["heal"]["method"] == "cosine"
    assert "160 calibration tokens" in config.data


@pytest.mark.parametrize("model_type", HEALABLE)
def test_generation_with_cache_and_save_reload(model_type, tmp_path):
    healed, config = prune_depth(build_tiny_model(model_type), remove=[1, 4], data=_rows(), heal="lstsq")
    prompt = torch.randint(3, 320, (2, 8))
    out = healed.generate(prompt, max_new_tokens=14, do_sample=False, use_cache=True)
    assert torch.equal(out, healed.generate(prompt, max_new_tokens=14, do_sample=False, use_cache=False))
    healed.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    reloaded = hf_recover.load_pruned(tmp_path).eval()
    ids = torch.randint(3, 320, (2, 20))
    for name, tensor in healed.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with torch.no_grad():  # the reload may pick another attention kernel: equal up to float round-off
        torch.testing.assert_close(reloaded(ids).logits, healed(ids).logits, rtol=1e-5, atol=1e-5)
    assert PrunedConfig.find_for(reloaded).steps[-1]["heal"] == config.steps[-1]["heal"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"remove": [2], "heal": "svd", "data": [{"input_ids": [5, 6]}]}, "heal takes one of"),
        ({"remove": [2], "heal": "lstsq"}, "pass data="),
        ({"n": 2, "method": "last", "heal": "cosine"}, "pass data="),
    ],
)
def test_bad_input_raises_before_any_work(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_depth(tiny_llama, **kwargs)
    assert len(tiny_llama.model.layers) == 6


def test_gemma3_is_refused():
    model = build_tiny_model("gemma3_text")
    with pytest.raises(ValueError, match="a norm sits between its down_proj"):
        prune_depth(model, remove=[2], data=_rows(), heal="lstsq", inplace=True)
    assert len(model.model.layers) == 6


def test_depth_recovery_preset(tmp_path):
    from hf_recover import DistillationConfig

    config = DistillationConfig.for_depth_recovery(output_dir=str(tmp_path))
    for name, value in DistillationConfig.DEPTH_RECOVERY_RECIPE.items():
        assert getattr(config, name) == value, name
    changed = DistillationConfig.for_depth_recovery(output_dir=str(tmp_path), temperature=3.0, max_steps=7)
    assert (changed.temperature, changed.max_steps) == (3.0, 7)
    assert changed.alpha == DistillationConfig.DEPTH_RECOVERY_RECIPE["alpha"]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillationConfig.for_depth_recovery(output_dir=str(tmp_path), temperature=0.0)


def test_select_candidate_builds_healed_candidates_without_touching_the_teacher(tiny_llama):
    from hf_recover.prune import select_candidate

    data = _rows(n_rows=12)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    report = select_candidate(
        tiny_llama,
        {"plain": {"depth": {"remove": [2, 3]}}, "healed": {"depth": {"remove": [2, 3], "heal": "lstsq"}}},
        data,
        rank_by="kl",
    )
    for name, tensor in tiny_llama.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    kl = {r.name: r.kl for r in report.results}
    assert kl["healed"] < kl["plain"]
    assert report.best.pruned_config.steps[-1]["heal"]["spans"] == [[1, 3]]
    with pytest.raises(ValueError, match="pass data="):
        select_candidate(tiny_llama, [{"depth": {"remove": [2], "heal": "lstsq"}}], None)


# -- block-local distillation after the map (heal=local) ------------------------------------------------------------


def _calibration(n=8, length=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": ids, "attention_mask": [1] * length}
        for ids in torch.randint(3, 320, (n, length), generator=g).tolist()
    ]


def test_local_healing_trains_the_block_before_each_cut_and_nothing_else(tiny_llama):
    data = _calibration()
    mapped, _ = prune_depth(tiny_llama, remove=[2, 3], heal="lstsq", data=data)
    local, config = prune_depth(
        tiny_llama, remove=[2, 3], heal={"method": "local", "steps": 60, "learning_rate": 1e-3}, data=data
    )
    heal = config.steps[0]["heal"]
    assert heal["method"] == "local" and heal["steps"] == 60 and heal["objective"] == "nmse"
    ((first, last),) = heal["loss_first_last"]
    assert last < first  # the local objective fell
    # only block 1 (the block before the cut, student index 1) changed from the least-squares heal
    changed = {
        name.split(".")[2]
        for name, tensor in local.state_dict().items()
        if not torch.equal(tensor, mapped.state_dict()[name])
    }
    assert changed == {"1"}
    for name, tensor in local.named_parameters():
        assert tensor.requires_grad, name  # a student ready to train


def test_local_healing_lowers_the_local_objective_against_a_hand_computation(tiny_llama):
    """The recorded loss is the RMS-normalised MSE between block 1's output and the teacher's after the cut."""
    from hf_recover.prune.local_healing import normalised_mse

    data = _calibration(n=4)
    student, config = prune_depth(
        tiny_llama, remove=[2, 3], heal={"method": "local", "steps": 40, "learning_rate": 1e-3}, data=data
    )
    ids = torch.tensor([row["input_ids"] for row in data])
    with torch.no_grad():
        wanted = tiny_llama(input_ids=ids, output_hidden_states=True).hidden_states[4]  # after teacher block 3
        got = student(input_ids=ids, output_hidden_states=True).hidden_states[2]  # after student block 1
        mapped, _ = prune_depth(tiny_llama, remove=[2, 3], heal="lstsq", data=data)
        before = mapped(input_ids=ids, output_hidden_states=True).hidden_states[2]
    assert normalised_mse(got.flatten(0, 1), wanted.flatten(0, 1)) < normalised_mse(
        before.flatten(0, 1), wanted.flatten(0, 1)
    )


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_a_locally_healed_student_saves_reloads_and_generates(model_type, tmp_path):
    from conftest import build_tiny_model
    from transformers import AutoModelForCausalLM

    teacher = build_tiny_model(model_type)
    student, config = prune_depth(teacher, remove=[3, 4], heal={"method": "local", "steps": 5}, data=_calibration())
    student.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # a plain model of its class
    ids = torch.tensor([_calibration()[0]["input_ids"][:8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)
    assert reloaded.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 12)


@pytest.mark.parametrize(
    "heal, match",
    [
        ({"method": "local", "steps": 0}, "steps must be an int >= 1"),
        ({"method": "local", "learning_rate": -1.0}, "learning_rate must be > 0"),
        ({"method": "local", "objective": "cosine"}, "objective must be one of"),
        ({"method": "lstsq", "steps": 50}, "are for method 'local'"),
        ({"method": "local", "epochs": 2}, "unknown key"),
    ],
)
def test_bad_local_settings_are_refused_before_any_work(tiny_llama, heal, match):
    with pytest.raises(ValueError, match=match):
        prune_depth(tiny_llama, remove=[2], heal=heal, data=_calibration())
