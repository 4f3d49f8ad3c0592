"""Attention-head pruning: query heads leave evenly within every key/value group, a removed head is exactly a
head whose output is zeroed, the ranking matches a naive recomputation, per-block counts reload, bad input raises."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_recover import PrunedConfig
from hf_recover.base.evaluation import count_parameters
from hf_recover.base.loading import load_pruned
from hf_recover.prune import prune_depth, prune_width
from hf_recover.prune.attention_heads import head_importance
from hf_recover.publish.card import generate_model_card

HEAD = 8  # every tiny model: hidden 32, 4 query heads of 8, 2 key/value heads


def _rows(n=4, length=12, seed=1, pad_last=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(n):
        mask = [1] * length
        if k == n - 1 and pad_last:
            mask[-pad_last:] = [0] * pad_last
        rows.append(
            {"input_ids": torch.randint(3, 320, (length,), generator=generator).tolist(), "attention_mask": mask}
        )
    return rows


def _naive_head_scores(model, rows):
    """Per block, per head: sqrt of the sum of squares of the head's o_proj input over real tokens, token by token."""
    inputs = {}
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, []).append(args[0]))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for row in rows:  # one sequence at a time, without padding: no mask involved at all
            real = sum(row["attention_mask"])
            model(torch.tensor([row["input_ids"][:real]]))
    for handle in handles:
        handle.remove()
    scores = {}
    for i, chunks in inputs.items():
        heads = chunks[0].shape[-1] // HEAD
        totals = [0.0] * heads
        for chunk in chunks:
            for token in chunk[0]:
                for h in range(heads):
                    totals[h] += float(token[h * HEAD : (h + 1) * HEAD].double().square().sum())
        scores[i] = torch.tensor(totals).sqrt()
    return scores


def test_ranking_matches_a_naive_recomputation(tiny_model):
    rows = _rows(pad_last=5)  # padding is left out of the scores
    scores = head_importance(tiny_model, rows, batch_size=4)
    naive = _naive_head_scores(tiny_model, rows)
    for i in range(6):
        torch.testing.assert_close(scores[i], naive[i].float(), rtol=1e-4, atol=1e-5)


def test_the_best_head_of_every_group_is_kept(tiny_model):
    rows = _rows()
    pruned, config = prune_width(tiny_model, heads=2, data=rows)
    naive = _naive_head_scores(tiny_model, rows)
    for i in range(6):
        # groups {0, 1} and {2, 3} share KV heads 0 and 1: one query head survives in each
        expected = [int(naive[i][:2].argmax()), 2 + int(naive[i][2:].argmax())]
        assert config.steps[0]["kept_heads"][str(i)] == expected


def test_shapes_and_parameter_counts(tiny_model):
    pruned, config = prune_width(tiny_model, heads=2, data=_rows())
    removed = 0
    for old, new in zip(tiny_model.model.layers, pruned.model.layers):
        attention = new.self_attn
        assert attention.q_proj.weight.shape == (2 * HEAD, 32)
        assert attention.o_proj.weight.shape == (32, 2 * HEAD)
        assert attention.k_proj.weight.shape == old.self_attn.k_proj.weight.shape  # every KV head stays
        assert attention.v_proj.weight.shape == old.self_attn.v_proj.weight.shape
        assert attention.num_key_value_groups == 1
        q_bias = 2 * HEAD if old.self_attn.q_proj.bias is not None else 0  # Qwen2's q bias
        removed += 2 * HEAD * 32 * 2 + q_bias
        if hasattr(old.self_attn, "q_norm"):  # Qwen3, Gemma3: one weight of head size shared by all heads
            assert torch.equal(attention.q_norm.weight, old.self_attn.q_norm.weight)
    assert count_parameters(pruned) == count_parameters(tiny_model) - removed
    assert config.student_num_parameters == count_parameters(pruned)
    assert config.teacher_attention_heads == [4] * 6 and config.student_attention_heads == [2] * 6
    assert pruned.config.num_attention_heads == 2 and pruned.config.head_dim == HEAD
    assert tiny_model.model.layers[0].self_attn.q_proj.out_features == 4 * HEAD  # inplace=False


def test_keeping_every_head_is_the_identity(tiny_model):
    pruned, _ = prune_width(tiny_model, heads=4, data=_rows())
    ids = torch.randint(3, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, tiny_model(ids).logits, rtol=0, atol=0)


def test_a_removed_head_equals_its_zeroed_output(tiny_model):
    pruned, config = prune_width(tiny_model, heads=2, data=_rows(), layers=[0, 3, 5])
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for block, kept in config.steps[0]["kept_heads"].items():
            o_proj = reference.model.layers[int(block)].self_attn.o_proj
            for h in sorted(set(range(4)) - set(kept)):
                o_proj.weight[:, h * HEAD : (h + 1) * HEAD] = 0
        ids = torch.randint(3, 320, (2, 20))  # longer than Gemma3's and Mistral's sliding windows
        torch.testing.assert_close(pruned(ids).logits, reference(ids).logits)
    assert config.student_attention_heads == [2, 4, 4, 2, 4, 2]


def test_per_block_head_counts_reload_and_generate(tiny_model, tmp_path):
    pruned, config = prune_width(tiny_model, heads=2, data=_rows(), layers=[1, 4])
    assert pruned.config.hf_recover_attention_heads == [4, 2, 4, 4, 2, 4]
    pruned.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path, attn_implementation="eager")
    ids = torch.randint(3, 320, (2, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    assert reloaded.pruned_config.student_attention_heads == [4, 2, 4, 4, 2, 4]
    generated = reloaded.generate(ids, max_new_tokens=6, do_sample=False)  # the KV cache across unequal blocks
    assert torch.equal(generated, pruned.generate(ids, max_new_tokens=6, do_sample=False))


def test_uniform_counts_reload_with_plain_from_pretrained(tiny_model, tmp_path):
    pruned, _ = prune_width(tiny_model, heads=0.5, data=_rows())
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids = torch.randint(3, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)


def test_heads_compose_with_depth_mlp_and_the_card(tiny_llama):
    shallow, _ = prune_depth(tiny_llama, remove=[0, 5])
    narrow, config = prune_width(shallow, heads=2, pruning_ratio=0.5, data=_rows(), layers=[1, 2])
    assert config.teacher_attention_heads == [4] * 6
    assert config.student_attention_heads == [4, 2, 2, 4]
    assert config.student_intermediate_sizes == [64, 32, 32, 64]
    assert config.kept_layer_indices == [1, 2, 3, 4]
    again = PrunedConfig.from_dict(config.to_dict())
    assert again == config
    card = generate_model_card(pruned_config=config).text
    assert "- Attention heads: [4, 4, 4, 4] → [4, 2, 2, 4] query heads (per student block)" in card
    _, uniform = prune_width(tiny_llama, heads=2, data=_rows())
    assert "- Attention heads: 4 → 2 query heads in every block" in generate_model_card(pruned_config=uniform).text


def test_old_configs_without_head_counts_still_load():
    data = PrunedConfig(teacher_num_layers=2, kept_layer_indices=[0, 1]).to_dict()
    del data["teacher_attention_heads"], data["student_attention_heads"]
    assert PrunedConfig.from_dict(data).student_attention_heads == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"heads": 3}, "breaks grouped-query attention"),
        ({"heads": 0}, "breaks grouped-query attention"),
        ({"heads": 6}, "only removes"),
        ({"heads": 0.0}, r"\(0, 1\)"),
        ({"heads": 1.0}, r"\(0, 1\)"),
        ({"heads": 0.2}, "no query head in some key/value group"),  # floor(0.8 / 2) * 2 = 0
        ({"heads": "2"}, "count"),
        ({"heads": 2, "data": None}, "pass data="),
        ({"heads": 2, "layers": [7]}, "outside"),
    ],
)
def test_bad_input_raises_before_touching_the_model(tiny_llama, kwargs, match):
    kwargs = {"data": _rows(), **kwargs}
    with pytest.raises(ValueError, match=match):
        prune_width(tiny_llama, inplace=True, **kwargs)
    assert [layer.self_attn.q_proj.out_features for layer in tiny_llama.model.layers] == [32] * 6


def test_the_card_loads_per_block_head_counts_with_load_pruned(tiny_llama):
    _, per_block = prune_width(tiny_llama, heads=2, data=_rows(), layers=[0])
    card = generate_model_card(pruned_config=per_block).text
    assert "model = load_pruned(model_id)" in card
    assert "Per-block MLP" not in card  # the MLP was not pruned: no table of unchanged sizes
    _, uniform = prune_width(tiny_llama, heads=2, data=_rows())
    assert "model = load_pruned(model_id)" not in generate_model_card(pruned_config=uniform).text
