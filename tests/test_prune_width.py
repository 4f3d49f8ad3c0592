"""Width pruning: MLP outputs equal a manual slice of the weights, sizes follow the documented rules,
models with different per-layer sizes reload exactly, and bad input raises first."""

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hf_recover.base.evaluation import count_parameters
from hf_recover.base.loading import load_pruned
from hf_recover.prune import prune_depth, prune_width


def _maw(mlp):
    g, u = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
    return torch.tensor(
        [float(g[j].max() + g[j].min().abs() + u[j].max() + u[j].min().abs()) for j in range(g.shape[0])]
    )


def _manual_mlp(mlp, keep, x):
    """The teacher MLP with only neurons `keep`, written out by hand."""
    gate = x @ mlp.gate_proj.weight[keep].T
    up = x @ mlp.up_proj.weight[keep].T
    if mlp.gate_proj.bias is not None:
        gate, up = gate + mlp.gate_proj.bias[keep], up + mlp.up_proj.bias[keep]
    out = (mlp.act_fn(gate) * up) @ mlp.down_proj.weight[:, keep].T
    return out + mlp.down_proj.bias if mlp.down_proj.bias is not None else out


def test_mlp_outputs_equal_a_manual_slice(tiny_model):
    pruned, config = prune_width(tiny_model, pruning_ratio=0.25)
    x = torch.randn(2, 5, 32)
    for i in range(6):
        teacher_mlp = tiny_model.model.layers[i].mlp
        scores = _maw(teacher_mlp)
        keep = sorted(sorted(range(64), key=lambda j: -scores[j])[:48])  # the 48 highest-scored neurons
        with torch.no_grad():
            torch.testing.assert_close(pruned.model.layers[i].mlp(x), _manual_mlp(teacher_mlp, keep, x))
        assert pruned.model.layers[i].mlp.up_proj.weight.shape == (48, 32)
    assert pruned.config.intermediate_size == 48
    assert config.student_intermediate_sizes == [48] * 6
    assert tiny_model.model.layers[0].mlp.up_proj.weight.shape == (64, 32)  # inplace=False


def test_biases_are_sliced_too(tiny_model_factory):
    teacher = tiny_model_factory("llama", mlp_bias=True)
    with torch.no_grad():
        for layer in teacher.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.bias.normal_()
    pruned, _ = prune_width(teacher, pruning_ratio=0.5, method="pon", layers=[2])
    mlp = teacher.model.layers[2].mlp
    g, u = mlp.gate_proj.weight, mlp.up_proj.weight
    scores = g.abs().sum(1) * u.abs().sum(1)
    keep = sorted(torch.topk(scores, 32).indices.tolist())
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned.model.layers[2].mlp(x), _manual_mlp(mlp, keep, x))


@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({"pruning_ratio": 0.25}, 48),
        ({"pruning_ratio": 0.3}, 44),  # floor(64 * 0.7) = 44
        ({"pruning_ratio": 0.3, "divisor": 8}, 40),
        ({"expansion_rate": 1.5}, 48),  # 1.5 * hidden 32
        ({"expansion_rate": 1.9, "divisor": 16}, 48),  # floor(60.8 / 16) * 16
        ({"expansion_rate": 2.0}, 64),  # the current size: allowed, nothing removed
    ],
)
def test_target_sizes(tiny_llama, kwargs, size):
    pruned, config = prune_width(tiny_llama, **kwargs)
    assert [layer.mlp.down_proj.in_features for layer in pruned.model.layers] == [size] * 6
    assert config.student_intermediate_sizes == [size] * 6
    assert config.student_num_parameters == count_parameters(pruned)


def test_activation_method_uses_data(tiny_llama):
    rows = [{"input_ids": torch.randint(3, 320, (12,)).tolist(), "attention_mask": [1] * 12} for _ in range(3)]
    pruned, config = prune_width(tiny_llama, pruning_ratio=0.5, method="activation", data=rows, layers=[0])
    mlp = tiny_llama.model.layers[0].mlp
    inputs = []
    handle = mlp.down_proj.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        tiny_llama(torch.tensor([r["input_ids"] for r in rows]))
    handle.remove()
    h = torch.cat(inputs)
    scores = mlp.down_proj.weight.norm(dim=0) * h.norm(dim=0)
    keep = sorted(torch.topk(scores, 32).indices.tolist())
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned.model.layers[0].mlp(x), _manual_mlp(mlp, keep, x))
    assert config.data.startswith("36 calibration tokens in 3 sequences")
    assert config.steps[0]["scores"][0]["kept"] == 32


def test_uniform_sizes_reload_with_plain_from_pretrained(tiny_model, tmp_path):
    pruned, config = prune_width(tiny_model, pruning_ratio=0.5)
    pruned.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids = torch.randint(3, 320, (2, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    assert reloaded.config.intermediate_size == 32


def test_depth_then_width_compose(tiny_llama, tmp_path):
    shallow, _ = prune_depth(tiny_llama, remove=[1, 4])
    both, config = prune_width(shallow, pruning_ratio=0.25, layers=[0, 3])
    assert both.pruned_config is config
    assert config.kept_layer_indices == [0, 2, 3, 5]
    assert config.teacher_num_layers == 6
    assert config.teacher_intermediate_sizes == [64] * 6
    assert config.student_intermediate_sizes == [48, 64, 64, 48]
    assert config.pruning_types == ["depth", "width"]
    assert config.teacher_num_parameters == count_parameters(tiny_llama)

    # width then depth: the per-layer sizes follow the kept blocks and still reload
    narrow, _ = prune_width(tiny_llama, pruning_ratio=0.5, layers=[1, 2])
    short, config2 = prune_depth(narrow, remove=[0])
    assert short.config.hf_recover_intermediate_sizes == [32, 32, 64, 64, 64]
    assert config2.kept_layer_indices == [1, 2, 3, 4, 5]
    short.save_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path, attn_implementation="eager")
    ids = torch.randint(3, 320, (1, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, short(ids).logits)

    # removing the narrow blocks makes the sizes equal again: plain from_pretrained works
    uniform, _ = prune_depth(narrow, remove=[1, 2])
    assert not hasattr(uniform.config, "hf_recover_intermediate_sizes")
    assert uniform.config.intermediate_size == 64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pruning_ratio": 0.0}, r"\(0, 1\)"),
        ({"pruning_ratio": 1.0}, r"\(0, 1\)"),
        ({"pruning_ratio": -0.2}, r"\(0, 1\)"),
        ({"pruning_ratio": 0.99}, "keep at least one"),  # floor(64 * 0.01) = 0
        ({"expansion_rate": 0.01}, "keep at least one"),  # floor(0.32) = 0
        ({"expansion_rate": 0.0}, "> 0"),
        ({"expansion_rate": 3.0}, "only removes"),
        ({"pruning_ratio": 0.5, "expansion_rate": 1.0}, "exactly one"),
        ({}, "exactly one"),
        ({"pruning_ratio": 0.5, "divisor": 0}, "divisor"),
        ({"pruning_ratio": 0.5, "method": "activation"}, "pass data="),
        ({"pruning_ratio": 0.5, "method": "random"}, "method must be one of"),
        ({"pruning_ratio": 0.5, "layers": [6]}, "outside"),
        ({"pruning_ratio": 0.25, "hidden_method": "rotate"}, "hidden_method='rotate' .* nothing would be rotated"),
    ],
)
def test_bad_input_raises_before_touching_the_model(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_width(tiny_llama, inplace=True, **kwargs)
    assert [layer.mlp.up_proj.out_features for layer in tiny_llama.model.layers] == [64] * 6


def test_non_glu_mlp_raises(tiny_llama):
    tiny_llama.model.layers[3].mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    with pytest.raises(ValueError, match="Block 3 has no GLU MLP"):
        prune_width(tiny_llama, pruning_ratio=0.5, inplace=True)
    assert tiny_llama.model.layers[0].mlp.up_proj.out_features == 64


def test_expansion_rate_documented_rounding():
    # the rule in prune_width's docstring, on SmolLM2's sizes
    from hf_recover.prune.width import target_sizes

    assert target_sizes([1536], 576, pruning_ratio=0.2, expansion_rate=None) == [math.floor(1536 * 0.8)]
    assert target_sizes([1536], 576, pruning_ratio=None, expansion_rate=2.0, divisor=128) == [1152]
    assert target_sizes([100], 10, pruning_ratio=0.3, expansion_rate=None) == [70]  # not 69
