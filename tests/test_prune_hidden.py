"""Hidden-size pruning: the pruned model has the shapes a model built at the new hidden size has, the ranking
matches a naive recomputation, Gemma3's embedding scale is compensated, generation with the KV cache and
save/load keep working, bad input raises first."""

import copy

import pytest
import torch
from conftest import build_tiny_model, make_args
from transformers import AutoModelForCausalLM

from hf_recover.base.evaluation import count_parameters
from hf_recover.base.loading import load_pruned
from hf_recover.prune import prune_width
from hf_recover.prune.hidden import hidden_importance
from hf_recover.publish.card import generate_model_card


def _rows(n=4, length=12, pad_last=0):
    generator = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, 320, (length,), generator=generator).tolist()} for _ in range(n)]
    for k, row in enumerate(rows):
        row["attention_mask"] = (
            [1] * length if k < n - 1 or not pad_last else [1] * (length - pad_last) + [0] * pad_last
        )
    return rows


def _naive_channel_scores(model, rows):
    """Sum over every residual-stream norm (the blocks' own norms and the final norm) of the per-channel L2 norm of
    its output over real tokens, one unpadded sequence at a time."""
    norms = [m for layer in model.model.layers for n, m in layer.named_children() if n.endswith("layernorm")]
    norms.append(model.model.norm)
    outputs = {k: [] for k in range(len(norms))}
    handles = [
        norm.register_forward_hook(lambda m, a, out, k=k: outputs[k].append(out[0])) for k, norm in enumerate(norms)
    ]
    with torch.no_grad():
        for row in rows:
            real = sum(row["attention_mask"])
            model(torch.tensor([row["input_ids"][:real]]))
    for handle in handles:
        handle.remove()
    total = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    for chunks in outputs.values():
        total += torch.cat(chunks).double().norm(dim=0)
    return total


def test_ranking_matches_a_naive_recomputation(tiny_model):
    rows = _rows(pad_last=4)
    torch.testing.assert_close(
        hidden_importance(tiny_model, rows, batch_size=4), _naive_channel_scores(tiny_model, rows).float()
    )
    pruned, config = prune_width(tiny_model, hidden_size=0.5, data=rows)
    naive = _naive_channel_scores(tiny_model, rows)
    keep = sorted(torch.topk(naive, 16).indices.tolist())
    for old, new in zip(tiny_model.model.layers, pruned.model.layers):
        torch.testing.assert_close(new.input_layernorm.weight, old.input_layernorm.weight[keep])
        torch.testing.assert_close(new.mlp.down_proj.weight, old.mlp.down_proj.weight[keep])
        torch.testing.assert_close(new.self_attn.q_proj.weight, old.self_attn.q_proj.weight[:, keep])
    assert config.student_hidden_size == 16 and config.teacher_hidden_size == 32


@pytest.mark.parametrize("tied", [True, False])
def test_shapes_and_parameter_counts_match_a_model_built_at_the_new_size(tiny_model, tied):
    model_type = tiny_model.config.model_type
    teacher = build_tiny_model(model_type, tie_word_embeddings=tied)
    pruned, config = prune_width(teacher, hidden_size=16, data=_rows())
    reference = build_tiny_model(model_type, tie_word_embeddings=tied, hidden_size=16, head_dim=8)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert count_parameters(pruned) == count_parameters(reference) == config.student_num_parameters
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tied
    assert pruned.config.hidden_size == 16 and pruned.config.head_dim == 8
    assert teacher.config.hidden_size == 32 and teacher.model.embed_tokens.weight.shape == (320, 32)  # untouched


def test_keeping_every_channel_is_the_identity(tiny_model):
    pruned, _ = prune_width(tiny_model, hidden_size=32, data=_rows())
    ids = torch.randint(3, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, tiny_model(ids).logits, rtol=0, atol=0)


def test_generate_with_the_kv_cache_and_round_trip(tiny_model, tmp_path):
    pruned, config = prune_width(tiny_model, hidden_size=16, heads=2, data=_rows(), layers=[0, 2])
    ids = torch.randint(3, 320, (2, 7))
    cached = pruned.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = pruned.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)  # 19 tokens: past Gemma3's 8-token and Mistral's 16-token windows
    pruned.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    assert reloaded.config.hidden_size == 16
    assert torch.equal(reloaded.generate(ids, max_new_tokens=12, do_sample=False), cached)


def test_uniform_hidden_pruning_reloads_with_plain_from_pretrained(tiny_model, tmp_path):
    pruned, _ = prune_width(tiny_model, hidden_size=24, data=_rows())
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids = torch.randint(3, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)


@pytest.mark.parametrize("tied", [True, False])
def test_gemma3_embedding_scale_is_compensated(tiny_model_factory, tied):
    teacher = tiny_model_factory("gemma3_text", tie_word_embeddings=tied)
    pruned, _ = prune_width(teacher, hidden_size=8, heads=2, data=_rows())
    keep = sorted(torch.topk(hidden_importance(teacher, _rows()), 8).indices.tolist())  # checked above
    ids = torch.randint(3, 320, (2, 5))
    with torch.no_grad():
        # transformers multiplies by sqrt(hidden) of the config: 8 ** 0.5 now, as it will be after reloading
        assert float(pruned.model.embed_tokens.embed_scale) == pytest.approx(8**0.5)
        torch.testing.assert_close(pruned.model.embed_tokens(ids), teacher.model.embed_tokens(ids)[..., keep])
        # the final norm and the lm_head give the logits the teacher's weights, restricted to `keep`, would give
        h = torch.randn(2, 5, 8)
        rms = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + teacher.config.rms_norm_eps)
        expected = (rms * (1 + teacher.model.norm.weight[keep])) @ teacher.lm_head.weight[:, keep].T
        torch.testing.assert_close(pruned.lm_head(pruned.model.norm(h)), expected)


def test_the_card_shows_the_hidden_size(tiny_llama):
    _, config = prune_width(tiny_llama, hidden_size=16, data=_rows())
    assert "- Hidden size: 32 → 16" in generate_model_card(pruned_config=config).text


def test_qwen2_needs_no_divisibility(tiny_model_factory, tmp_path):
    pruned, _ = prune_width(tiny_model_factory("qwen2"), hidden_size=30, data=_rows())  # 30 % 4 heads != 0: fine
    pruned.save_pretrained(tmp_path)
    assert load_pruned(tmp_path).config.hidden_size == 30


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 0.0}, r"\(0, 1\)"),
        ({"hidden_size": 1.0}, r"\(0, 1\)"),
        ({"hidden_size": 40}, "keep between 1 and 32"),
        ({"hidden_size": 0}, "keep between 1 and 32"),
        ({"hidden_size": True}, "size"),
        ({"hidden_size": 30}, "multiple of num_attention_heads"),  # Llama's config checks hidden % heads
        ({"hidden_size": 18, "heads": 2, "layers": [0]}, "multiple of num_attention_heads"),  # 4 heads remain
        ({"hidden_size": 16, "data": None}, "pass data="),
    ],
)
def test_bad_input_raises_before_touching_the_model(tiny_llama, kwargs, match):
    kwargs = {"data": _rows(), **kwargs}
    before = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(ValueError, match=match):
        prune_width(tiny_llama, inplace=True, **kwargs)
    assert tiny_llama.config.hidden_size == 32
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())


# -- specs: the CLI shorthand, select_candidate, hf-recover prune ---------------------------------------------------


def test_select_candidate_builds_head_and_hidden_candidates(tiny_llama):
    from hf_recover.prune import select_candidate

    rows = [{**row, "labels": row["input_ids"]} for row in _rows(pad_last=0)]
    specs = {
        "heads": {"width": {"heads": 2}},
        "hidden": {"width": {"hidden_size": 16}},
        "all": {"depth": {"remove": [5]}, "width": {"pruning_ratio": 0.5, "heads": 2, "hidden_size": 16}},
    }
    report = select_candidate(tiny_llama, specs, rows)
    by_name = {r.name: r for r in report.results}
    direct, _ = prune_width(tiny_llama, heads=2, data=rows)
    assert by_name["heads"].num_parameters == count_parameters(direct)
    assert by_name["hidden"].pruned_config.student_hidden_size == 16
    assert by_name["all"].pruned_config.student_attention_heads == [2] * 5
    assert tiny_llama.model.layers[0].self_attn.q_proj.out_features == 32  # the teacher stays intact
    assert tiny_llama.model.embed_tokens.weight.shape == (320, 32)
    with pytest.raises(ValueError, match="candidate 'odd': .*breaks grouped-query attention"):
        select_candidate(tiny_llama, {"odd": {"width": {"heads": 3}}}, rows)
    with pytest.raises(ValueError, match="candidate 'odd': .*multiple of num_attention_heads"):
        select_candidate(tiny_llama, {"odd": {"width": {"hidden_size": 30}}}, rows)


def test_cli_prune_heads_and_hidden_then_reload(tmp_path, tiny_tokenizer):
    from conftest import TINY_TEXTS

    from hf_recover import PrunedConfig
    from hf_recover.cli import main as cli

    build_tiny_model("qwen3").save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "data").mkdir()
    for i in range(20):
        (tmp_path / "data" / f"doc{i}.txt").write_text(" ".join(TINY_TEXTS[(i + j) % 10] for j in range(3)))
    cli(["prune", "--model", str(tmp_path / "teacher"), "--prune", "heads:2+hidden:0.5", "--output_dir",
         str(tmp_path / "narrow"), "--dataset", str(tmp_path / "data"), "--max_length", "32",
         "--calibration_blocks", "3"])  # fmt: skip
    pruned = PrunedConfig.from_pretrained(tmp_path / "narrow")
    assert pruned.student_hidden_size == 16 and pruned.student_attention_heads == [2] * 6
    assert pruned.data.startswith("96 calibration tokens in 3 sequences")
    model = load_pruned(tmp_path / "narrow")
    assert model.model.embed_tokens.weight.shape == (320, 16)


# -- recovery: a hidden-pruned student distils through the projectors -----------------------------------------------


def test_a_hidden_pruned_student_trains_through_projectors_and_resumes(tmp_path, tiny_tokenizer):
    from conftest import TINY_TEXTS
    from datasets import Dataset
    from torch import nn

    from hf_recover import DistillationTrainer, prepare_recovery_dataset, prune_depth
    from hf_recover.distill.trainer import PROJECTORS_NAME

    texts = [text[: 12 + 7 * i] for i, text in enumerate(TINY_TEXTS * 2)]
    data = prepare_recovery_dataset(Dataset.from_dict({"text": texts}), tiny_tokenizer, max_length=24, packing=False)
    teacher = build_tiny_model(seed=1)
    shallow, _ = prune_depth(teacher, remove=[1, 4])
    student, pruned = prune_width(shallow, hidden_size=16, heads=2, layers=[0, 3], pruning_ratio=0.5, data=_rows())
    student.save_pretrained(tmp_path / "student")
    pruned.save_pretrained(tmp_path / "student")

    def args(name):
        return make_args(
            tmp_path, name, learning_rate=1e-3, max_steps=4, save_strategy="steps", save_steps=2, gamma=0.5, delta=0.2
        )

    full = DistillationTrainer(str(tmp_path / "student"), teacher, args("full"), train_dataset=data)
    assert full.layer_map == [0, 2, 3, 5]  # the blocks depth pruning kept
    assert [(p.in_features, p.out_features) for p in full.projectors] == [(16, 32)] * 4
    initial = copy.deepcopy(full.projectors)
    full.train()
    assert (tmp_path / "full" / "checkpoint-2" / PROJECTORS_NAME).is_file()
    for p, p0 in zip(full.projectors.parameters(), initial.parameters()):
        assert not torch.allclose(p, p0)  # the projectors trained

    resumed = DistillationTrainer(str(tmp_path / "student"), teacher, args("resumed"), train_dataset=data)
    for param in resumed.projectors.parameters():  # the checkpoint must overwrite these
        nn.init.normal_(param)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for key in ("loss", "align", "fdd"):
        full_log = [e[key] for e in full.state.log_history if key in e]
        resumed_log = [e[key] for e in resumed.state.log_history if key in e]
        assert len(full_log) == len(resumed_log) == 4, key
        assert resumed_log[2:] == pytest.approx(full_log[2:], rel=1e-5), key
    for p, q in zip(full.projectors.parameters(), resumed.projectors.parameters()):
        torch.testing.assert_close(q, p)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p)
