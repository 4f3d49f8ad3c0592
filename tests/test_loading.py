"""Loading models (hf_recover.base.loading): per-block MLP sizes rebuilt by load_pruned, load_model by name, folder
or 'default' with its dtype, and the check that pruned_config.json matches the weights next to it."""

import json

import pytest
import torch
from conftest import build_tiny_model
from transformers import AutoModelForCausalLM

import hf_recover
from hf_recover.base.loading import check_pruned_config_matches_weights, load_model, load_pruned, resolve_dtype
from hf_recover.prune import prune_depth, prune_width


def test_different_sizes_reload_with_load_pruned(tiny_model, tmp_path):
    pruned, config = prune_width(tiny_model, pruning_ratio=0.5, layers=[1, 4])
    assert config.student_intermediate_sizes == [64, 32, 64, 64, 32, 64]
    pruned.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path, attn_implementation="eager")
    assert [layer.mlp.up_proj.out_features for layer in reloaded.model.layers] == [64, 32, 64, 64, 32, 64]
    ids = torch.randint(3, 320, (2, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    assert reloaded.pruned_config == config
    with pytest.raises(RuntimeError, match="mismatched_sizes"):  # plain from_pretrained refuses, loudly
        AutoModelForCausalLM.from_pretrained(tmp_path)
    # the block constructor is patched only while load_pruned runs
    fresh = build_tiny_model(tiny_model.config.model_type)
    assert fresh.model.layers[1].mlp.up_proj.out_features == 64


def test_load_pruned_without_pruned_config_and_with_dtype(tiny_llama, tmp_path):
    pruned, _ = prune_width(tiny_llama, expansion_rate=1.0, layers=[0])
    pruned.save_pretrained(tmp_path)  # config.json alone carries the per-layer sizes
    reloaded = load_pruned(tmp_path, dtype=torch.bfloat16)
    assert not hasattr(reloaded, "pruned_config")
    assert reloaded.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert torch.equal(
        reloaded.model.layers[0].mlp.down_proj.weight, pruned.model.layers[0].mlp.down_proj.weight.bfloat16()
    )


def test_the_public_loaders_are_one_function():
    assert hf_recover.load_pruned is load_pruned


def _save_different_sizes(model, folder, tokenizer=None):
    pruned, config = prune_width(model, pruning_ratio=0.5, layers=[1, 4])
    pruned.save_pretrained(folder)
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return pruned, config


def test_load_model_rebuilds_per_block_sizes_and_attaches_the_pruned_config(tiny_llama, tiny_tokenizer, tmp_path):
    pruned, config = _save_different_sizes(tiny_llama, tmp_path, tiny_tokenizer)
    model, tokenizer = load_model(str(tmp_path))
    assert not model.training and tokenizer.vocab_size == tiny_tokenizer.vocab_size
    assert model.dtype == torch.float32 and model.pruned_config == config
    ids = torch.randint(3, 320, (1, 9))
    with torch.no_grad():  # the same weights; the attention kernel may differ (sdpa here, eager in conftest)
        torch.testing.assert_close(model(ids).logits, pruned(ids).logits)


def test_load_model_dtype_names_and_auto(tiny_llama, tiny_tokenizer, tmp_path):
    tiny_llama.to(torch.bfloat16).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert load_model(str(tmp_path))[0].dtype == torch.float32  # float32 unless asked
    assert load_model(str(tmp_path), dtype="float16")[0].dtype == torch.float16
    assert load_model(str(tmp_path), dtype="auto")[0].dtype == torch.bfloat16  # as saved
    assert resolve_dtype(str(tmp_path), torch.float64) == torch.float64
    with pytest.raises(ValueError, match="Unknown dtype 'bf16'"):
        resolve_dtype(str(tmp_path), "bf16")


def test_load_model_default_is_the_embedded_teacher(monkeypatch):
    seen = {}

    def fake_teacher(cache_dir=None, *, dtype=None):
        seen["dtype"] = dtype
        return "model", "tokenizer"

    monkeypatch.setattr(hf_recover.base.defaults, "load_default_teacher", fake_teacher)
    assert load_model("default", dtype="bfloat16") == ("model", "tokenizer")
    assert seen["dtype"] == torch.bfloat16


def test_auto_dtype_of_the_default_teacher_is_the_one_its_cache_records(monkeypatch, tiny_llama, tmp_path):
    tiny_llama.to(torch.float16).save_pretrained(tmp_path)  # stands in for the converted teacher's folder
    monkeypatch.setattr(hf_recover.base.defaults, "default_teacher_path", lambda: tmp_path)
    assert resolve_dtype("default", "auto") == torch.float16


def test_the_pruned_config_check_reads_the_folder(tiny_llama, tmp_path):
    pruned, config = _save_different_sizes(tiny_llama, tmp_path)
    check_pruned_config_matches_weights(tmp_path)  # agrees: no error
    shallow, _ = prune_depth(tiny_llama, remove=[0])
    shallow.save_pretrained(tmp_path)  # other weights, the old pruned_config.json
    with pytest.raises(ValueError, match="it describes 6 blocks .* config.json has num_hidden_layers=5"):
        check_pruned_config_matches_weights(tmp_path)
    (tmp_path / "pruned_config.json").write_text(json.dumps({**config.to_dict(), "bogus": 1}))
    with pytest.raises(ValueError, match="is not a valid pruned config"):
        check_pruned_config_matches_weights(tmp_path)
