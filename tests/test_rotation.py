"""The hidden size by rotation (SliceGPT): the rotated model computes the same function before any direction is
deleted, the axes are the residual stream's principal axes, and the smaller model saves, reloads and generates."""

import copy

import pytest
import torch
from conftest import build_tiny_model

from hf_recover.base.loading import load_pruned
from hf_recover.prune import prune_width
from hf_recover.prune.rotation import fold_norms, residual_principal_axes, rotate_and_slice

ROTATABLE = ("llama", "qwen2", "qwen3", "mistral")


def _rows(n=4, length=20):
    return [
        {"input_ids": list(range(5 + 3 * i, 5 + 3 * i + length)), "attention_mask": [1] * length} for i in range(n)
    ]


def _with_norm_scales(model):
    """Norm weights away from 1, so that folding them is tested (fresh models have all-ones norms)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("model_type", ROTATABLE)
def test_the_rotated_model_computes_the_same_function(model_type, tied):
    model = _with_norm_scales(build_tiny_model(model_type, tie_word_embeddings=tied))
    rotated = copy.deepcopy(model)
    axes, _, _, _ = residual_principal_axes(rotated, _rows())
    assert fold_norms(rotated) is tied  # a tied lm_head is untied to take the final norm's scale
    rotate_and_slice(rotated, axes, model.config.hidden_size)  # every direction kept
    ids = torch.tensor([_rows()[1]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(rotated(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rotated.model.embed_tokens.weight, model.model.embed_tokens.weight)  # really rotated


def test_the_axes_are_the_principal_axes_of_the_normalised_residual_stream():
    model = build_tiny_model()
    rows = _rows()
    axes, variances, tokens, _ = residual_principal_axes(model, rows)
    torch.testing.assert_close(axes.T @ axes, torch.eye(axes.shape[0], dtype=torch.float64))  # orthonormal
    assert tokens == 80 and torch.all(variances[:-1] >= variances[1:])
    # by hand: every norm's input, RMS-normalised, over every token
    seen = []
    norms = [m for layer in model.model.layers for m in layer.children() if type(m).__name__.endswith("RMSNorm")]
    handles = [
        n.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].double())) for n in [*norms, model.model.norm]
    ]
    with torch.no_grad():
        for row in rows:
            model(input_ids=torch.tensor([row["input_ids"]]))
    for h in handles:
        h.remove()
    x = torch.cat(seen)
    x = x / x.square().mean(-1, keepdim=True).sqrt()
    covariance = x.T @ x
    for k in range(3):  # each leading axis is an eigenvector of the covariance with its eigenvalue
        torch.testing.assert_close(covariance @ axes[:, k], variances[k] * axes[:, k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", ROTATABLE)
def test_a_rotated_student_saves_reloads_and_generates(model_type, tmp_path):
    teacher = _with_norm_scales(build_tiny_model(model_type))
    student, config = prune_width(teacher, hidden_size=24, hidden_method="rotate", data=_rows())
    step = config.steps[-1]
    assert step["hidden_method"] == "rotate" and step["untied_lm_head"] is True and 0 < step["kept_variance"] < 1
    assert config.student_hidden_size == 24 and student.model.embed_tokens.weight.shape[1] == 24
    student.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path)
    assert reloaded.config.tie_word_embeddings is False
    ids = torch.tensor([_rows()[0]["input_ids"][:6]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)
    assert reloaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)


def test_gemma3_is_refused_before_any_work():
    teacher = build_tiny_model("gemma3_text")
    with pytest.raises(ValueError, match="post-attention / post-feedforward norms"):
        prune_width(teacher, hidden_size=24, hidden_method="rotate", data=_rows())
    with pytest.raises(ValueError, match="hidden_method must be one of"):
        prune_width(build_tiny_model(), hidden_size=24, hidden_method="spin", data=_rows())
