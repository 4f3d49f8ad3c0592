"""Depth pruning: the pruned model equals the teacher with the removed blocks skipped, generates with the
KV cache, round-trips through save/load for every architecture, and bad input raises first."""

import pytest
import torch
from conftest import build_tiny_model
from transformers import AutoModelForCausalLM

from hf_recover.base.evaluation import count_parameters
from hf_recover.base.pruned_config import PrunedConfig
from hf_recover.prune import block_importance, prune_depth


def _rows(n_rows=3, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (n_rows, length), generator=g)
    return [{"input_ids": r, "attention_mask": [1] * length, "labels": r} for r in ids.tolist()]


def _skip_blocks(model, removed):
    """Make the teacher's `removed` blocks identities: the reference for the pruned model."""

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return [model.model.layers[i].register_forward_hook(identity, with_kwargs=True) for i in removed]


def test_logits_equal_running_the_kept_blocks(tiny_model):
    # 20 tokens > Gemma3's (8) and Mistral's (16) sliding windows, so the per-block masks matter
    ids = torch.randint(3, 320, (2, 20))
    # Gemma3's blocks are [S, S, F, S, S, F] (S = sliding): keeping 2, 4, 5 gives [F, S, F], unlike the
    # first three entries, so an unsliced layer_types would give the wrong masks
    removed = [0, 1, 3]
    pruned, config = prune_depth(tiny_model, remove=removed)
    handles = _skip_blocks(tiny_model, removed)
    with torch.no_grad():
        expected = tiny_model(ids).logits
        actual = pruned(ids).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert config.kept_layer_indices == [2, 4, 5]
    assert len(tiny_model.model.layers) == 6  # inplace=False left the teacher alone


def test_per_layer_fields_are_fixed(tiny_model):
    teacher_types = getattr(tiny_model.config, "layer_types", None)
    pruned, _ = prune_depth(tiny_model, remove=[0, 2])
    kept = [1, 3, 4, 5]
    assert pruned.config.num_hidden_layers == 4
    assert len(pruned.model.layers) == 4
    if teacher_types is not None:
        assert pruned.config.layer_types == [teacher_types[i] for i in kept]
    for new_index, layer in enumerate(pruned.model.layers):
        assert layer.self_attn.layer_idx == new_index
        if hasattr(layer, "layer_idx"):
            assert layer.layer_idx == new_index
    # the pruned blocks are the teacher's kept ones (same weights, in order)
    for new_index, old_index in enumerate(kept):
        torch.testing.assert_close(
            pruned.model.layers[new_index].mlp.up_proj.weight, tiny_model.model.layers[old_index].mlp.up_proj.weight
        )


def test_generation_with_cache_matches_full_forward(tiny_model):
    pruned, _ = prune_depth(tiny_model, remove=[1, 3])
    prompt = torch.randint(3, 320, (2, 8))
    out = pruned.generate(
        prompt, max_new_tokens=14, do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True
    )
    no_cache = pruned.generate(prompt, max_new_tokens=14, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, no_cache)
    with torch.no_grad():
        full = pruned(out.sequences).logits
    # the logits of each cached step equal a full forward over the generated sequence
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, prompt.shape[1] - 1 + step], rtol=1e-4, atol=1e-4)


def test_save_and_reload_round_trip(tiny_model, tmp_path):
    pruned, config = prune_depth(tiny_model, remove=[2, 5])
    pruned.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(3, 320, (2, 20))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    assert reloaded.config.num_hidden_layers == 4
    assert getattr(reloaded.config, "layer_types", None) == getattr(pruned.config, "layer_types", None)
    assert PrunedConfig.find_for(reloaded) == config


def test_qwen2_sliding_layers_and_max_window_layers(tmp_path):
    # Qwen2 slides on blocks >= max_window_layers when use_sliding_window is on
    teacher = build_tiny_model("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=3)
    assert teacher.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    ids = torch.randint(3, 320, (2, 16))
    pruned, _ = prune_depth(teacher, remove=[1, 4])
    assert pruned.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert pruned.config.max_window_layers == 2
    handles = _skip_blocks(teacher, [1, 4])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)
    for h in handles:
        h.remove()
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert reloaded.config.layer_types == pruned.config.layer_types
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)


def test_methods_choose_the_right_blocks(tiny_llama):
    _, last = prune_depth(tiny_llama, n=2, method="last")
    assert last.removed_layer_indices == [4, 5]
    assert last.steps[0]["method"] == "last"

    scores = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.7, 0.3])
    _, by_importance = prune_depth(tiny_llama, n=3, scores=scores)
    assert by_importance.removed_layer_indices == [1, 3, 5]
    assert by_importance.steps[0]["scores"] == pytest.approx(scores.tolist())

    angular = [0.4, 0.3, 0.1, 0.2, 0.5]  # starts 0..4 of runs of 2
    _, by_angle = prune_depth(tiny_llama, n=2, method="angular", scores=angular)
    assert by_angle.removed_layer_indices == [2, 3]

    rows = _rows()
    measured = block_importance(tiny_llama, rows)
    _, from_data = prune_depth(tiny_llama, n=2, data=rows)
    assert from_data.removed_layer_indices == sorted(torch.argsort(measured)[:2].tolist())
    assert from_data.data.startswith("60 calibration tokens in 3 sequences")

    angular_scores = block_importance(tiny_llama, rows, method="angular", n_blocks=2)
    _, angular_data = prune_depth(tiny_llama, n=2, method="angular", data=rows)
    start = int(torch.argmin(angular_scores))
    assert angular_data.removed_layer_indices == [start, start + 1]


def test_only_blocks_runs_the_pruned_model_and_restores_the_full_one(tiny_model):
    from hf_recover.prune.greedy import only_blocks

    ids = torch.randint(3, 320, (2, 20))  # longer than the sliding windows: the per-block masks matter
    kept = [2, 4, 5]
    pruned, _ = prune_depth(tiny_model, remove=[0, 1, 3])
    with torch.no_grad():
        full = tiny_model(ids, use_cache=False).logits
        with only_blocks(tiny_model, kept):
            inside = tiny_model(ids, use_cache=False).logits
            layer_types = getattr(tiny_model.config, "layer_types", None)
        after = tiny_model(ids, use_cache=False).logits
        expected = pruned(ids, use_cache=False).logits
    torch.testing.assert_close(inside, expected, rtol=1e-5, atol=1e-5)
    assert layer_types == getattr(pruned.config, "layer_types", None)
    assert torch.equal(after, full)
    assert len(tiny_model.model.layers) == tiny_model.config.num_hidden_layers == 6


def test_greedy_removal_equals_a_naive_search_over_pruned_copies(tiny_llama):
    """Each step removes the block whose removal gives the lowest KL to the full model: checked against building
    every candidate with prune_depth and scoring it with the evaluation loop's KL."""
    from hf_recover.base.evaluation import score_models

    rows = _rows(n_rows=4, length=16)
    removed_naive, kl_naive = [], []
    for _ in range(2):
        kl = {}
        for block in (b for b in range(6) if b not in removed_naive):
            candidate, _ = prune_depth(tiny_llama, remove=sorted([*removed_naive, block]))
            kl[block] = score_models({"full": tiny_llama, "c": candidate}, rows, reference="full")["c"]["kl"]
        best = min(kl, key=kl.get)
        removed_naive.append(best)
        kl_naive.append(kl[best])

    pruned, config = prune_depth(tiny_llama, n=2, method="greedy", data=rows)
    assert config.removed_layer_indices == sorted(removed_naive)
    step = config.steps[0]
    assert step["method"] == "greedy" and step["score"] == "forward_kl"
    assert step["kl_after_each_removal"] == pytest.approx(kl_naive, rel=1e-4, abs=1e-6)
    assert len(pruned.model.layers) == 4 and len(tiny_llama.model.layers) == 6


def test_pruned_config_describes_the_pruning(tiny_llama):
    pruned, config = prune_depth(tiny_llama, remove=[0, 5])
    assert pruned.pruned_config is config
    assert config.architecture == "llama"
    assert config.teacher_num_layers == 6
    assert config.kept_layer_indices == [1, 2, 3, 4]
    assert config.teacher_num_parameters == count_parameters(tiny_llama)
    assert config.student_num_parameters == count_parameters(pruned) < config.teacher_num_parameters
    assert config.teacher_intermediate_sizes == [64] * 6 and config.student_intermediate_sizes == [64] * 4
    assert config.method == "depth:manual"

    # pruning again composes: student block 1 of the 2-block result is teacher block 3
    again, both = prune_depth(pruned, remove=[0, 3])
    assert both.kept_layer_indices == [2, 3]
    assert both.teacher_num_layers == 6
    assert both.method == "depth:manual+depth:manual"
    assert pruned.pruned_config is config  # the first result was not modified


def test_inplace(tiny_llama):
    pruned, _ = prune_depth(tiny_llama, remove=[3], inplace=True)
    assert pruned is tiny_llama
    assert len(tiny_llama.model.layers) == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"remove": [0, 1, 2, 3, 4, 5]}, "keep at least one"),
        ({"remove": [1, 1]}, "more than once"),
        ({"remove": [6]}, "outside"),
        ({"remove": [-1]}, "outside"),
        ({"remove": []}, "empty"),
        ({"remove": [1], "n": 1}, "not both"),
        ({"n": 6, "method": "last"}, "n must be"),
        ({"n": 0, "method": "last"}, "n must be"),
        ({"n": 2}, "pass data="),
        ({"n": 2, "method": "random"}, "method must be one of"),
        ({"n": 2, "scores": [0.1, 0.2]}, "needs 6"),
        ({"n": 2, "method": "angular", "scores": [0.1] * 6}, "needs 5"),
        ({"n": 2, "method": "greedy"}, "pass data="),
        ({"n": 2, "method": "greedy", "scores": [0.1] * 6}, "not scores="),
        ({}, "Say which blocks"),
    ],
)
def test_bad_input_raises_before_touching_the_model(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_depth(tiny_llama, inplace=True, **kwargs)
    assert len(tiny_llama.model.layers) == 6
    assert tiny_llama.config.num_hidden_layers == 6


def test_unsupported_architecture_raises():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=320))
    with pytest.raises(ValueError, match="llama.*qwen2.*qwen3.*gemma3_text.*mistral"):
        prune_depth(model, remove=[0])


@pytest.mark.slow
def test_importance_beats_last_blocks_on_the_default_teacher():
    """Removing 6 of 30 blocks by block influence gives >= 100x lower perplexity than the last 6."""
    import hf_recover
    from hf_recover.base.data import prepare_recovery_dataset
    from hf_recover.base.evaluation import evaluate_perplexity

    teacher, tokenizer = hf_recover.load_default_teacher()
    corpus = hf_recover.load_default_corpus()
    data = prepare_recovery_dataset(corpus["validation"], tokenizer, max_length=256)
    calibration, held_out = data.select(range(8)), data.select(range(8, 16))
    by_importance, _ = prune_depth(teacher, n=6, data=calibration)
    last, _ = prune_depth(teacher, n=6, method="last")
    ppl_importance = evaluate_perplexity(by_importance, held_out)["perplexity"]
    ppl_last = evaluate_perplexity(last, held_out)["perplexity"]
    assert ppl_last >= 100 * ppl_importance, (ppl_importance, ppl_last)
