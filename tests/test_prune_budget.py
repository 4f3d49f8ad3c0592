"""Width pruning at a parameter count: the meta-device count equals the pruned model's, the chosen MLP size is
the largest that fits, and the strategy lab's `width` rows are pruned to the depth students' size."""

import json

import pytest
import torch
from conftest import TINY_TEXTS, build_tiny_model

from hf_recover.base.evaluation import count_parameters
from hf_recover.prune import prune_depth, prune_width
from hf_recover.prune.budget import parameters_at, width_spec_at_parameters


def _rows():
    generator = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(3, 320, (10,), generator=generator).tolist()} for _ in range(3)]


def test_the_meta_count_equals_the_pruned_models(tiny_model):
    shallow, _ = prune_depth(tiny_model, remove=[0, 4])
    assert parameters_at(tiny_model, num_layers=4) == count_parameters(shallow)
    narrow, _ = prune_width(tiny_model, heads=2, hidden_size=16, expansion_rate=1.5, data=_rows())
    assert parameters_at(tiny_model, hidden_size=16, heads=2, intermediate_size=48) == count_parameters(narrow)
    assert parameters_at(tiny_model) == count_parameters(tiny_model)


@pytest.mark.parametrize("divisor", [1, 8])
def test_the_mlp_size_is_the_largest_that_fits(tiny_llama, divisor):
    target = parameters_at(tiny_llama, num_layers=4)  # the size of the model with 2 of 6 blocks removed
    spec = width_spec_at_parameters(tiny_llama, target, heads=2, hidden_size=28, divisor=divisor)
    pruned, config = prune_width(tiny_llama, data=_rows(), **spec)
    size = pruned.model.layers[0].mlp.up_proj.out_features
    assert size % divisor == 0
    assert config.student_num_parameters <= target
    # naive: every MLP size one step larger would exceed the target
    assert parameters_at(tiny_llama, hidden_size=28, heads=2, intermediate_size=size + divisor) > target
    assert pruned.config.hidden_size == 28 and config.student_attention_heads == [2] * 6


def test_unreachable_targets_raise(tiny_llama):
    with pytest.raises(ValueError, match="even with the smallest MLP"):
        width_spec_at_parameters(tiny_llama, 1000, hidden_size=24)
    with pytest.raises(ValueError, match="already has fewer"):
        width_spec_at_parameters(tiny_llama, count_parameters(tiny_llama), hidden_size=16)
    with pytest.raises(ValueError, match="breaks grouped-query attention"):
        width_spec_at_parameters(tiny_llama, 30000, heads=3)


def test_strategy_lab_families_share_the_depth_cuts_size(tmp_path):
    """`depth`, `width` and `mix`: healed students of one parameter count, each with the assistant's columns."""
    from conftest import build_tiny_chat_tokenizer

    from hf_recover.cli import main as cli

    teacher = build_tiny_model("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    build_tiny_chat_tokenizer().save_pretrained(tmp_path / "teacher")
    (tmp_path / "data").mkdir()
    for i in range(30):
        (tmp_path / "data" / f"doc{i}.txt").write_text(" ".join(TINY_TEXTS[(i + j) % 10] for j in range(3)))
    cli(["compare", "--teacher", str(tmp_path / "teacher"), "--prune", "depth", "width", "mix", "--strategies",
         "ce_only", "--n_remove", "2", "--width_heads", "0.5", "--chat_prompts", "dev",
         "--output_dir", str(tmp_path / "lab"), "--max_steps", "2", "--curve_points", "2", "--dataset",
         str(tmp_path / "data"), "--max_length", "32", "--eval_max_length", "32", "--eval_blocks", "3",
         "--calibration_blocks", "3", "--use_cpu"])  # fmt: skip
    rows = {row["pruning"]: row for row in json.loads((tmp_path / "lab" / "results.json").read_text())}
    depth, width, mix = rows["depth"], rows["width"], rows["mix"]
    target = parameters_at(teacher, num_layers=4)
    assert depth["parameters"] == target and len(depth["removed"]) == 2 and depth["spec"]["depth"]["heal"] == "lstsq"
    assert width["removed"] == [] and width["spec"]["width"]["heal"] == "lstsq"
    assert len(mix["removed"]) == 1 and mix["spec"]["width"]["heads"] == 0.5
    for row in (width, mix):  # sized to the depth cut: at most its count, within one MLP step of it
        assert target - 6 * 3 * 32 < row["parameters"] <= target
    for row in rows.values():
        assistant = row["assistant"]
        assert [tokens for tokens, _ in assistant["curve"]] == [0, 64, 128]
        assert assistant["curve"][-1][1] == pytest.approx(assistant["recovery"])
        assert 0 <= assistant["top1_agreement"] <= 1
    assert depth["assistant"]["curve"][0][1] == pytest.approx(0.0)  # the reference: the first pruning listed
    assert "assistant: teacher's answers PPL" in (tmp_path / "lab" / "results.md").read_text()


def test_strategy_lab_width_rows_match_the_depth_size(tmp_path, tiny_tokenizer):
    from hf_recover.cli import main as cli

    teacher = build_tiny_model("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "data").mkdir()
    for i in range(30):
        (tmp_path / "data" / f"doc{i}.txt").write_text(" ".join(TINY_TEXTS[(i + j) % 10] for j in range(3)))
    cli(["compare", "--teacher", str(tmp_path / "teacher"), "--prune", "importance", "width", "--strategies",
         "ce_only", "--n_remove", "2", "--width_heads", "0.5", "--width_hidden", "0.875", "--output_dir",
         str(tmp_path / "lab"), "--max_steps", "2", "--dataset", str(tmp_path / "data"), "--max_length", "32",
         "--eval_max_length", "32", "--eval_blocks", "3", "--calibration_blocks", "3", "--use_cpu"])  # fmt: skip
    rows = json.loads((tmp_path / "lab" / "results.json").read_text())
    depth, width = rows
    assert (depth["pruning"], width["pruning"]) == ("importance", "width")
    assert width["removed"] == [] and width["spec"]["width"]["heads"] == 0.5
    assert width["parameters"] <= depth["parameters"] == parameters_at(teacher, num_layers=4)
    assert width["train_tokens"] == depth["train_tokens"]  # the same budget
    assert "| width | ce_only | none |" in (tmp_path / "lab" / "results.md").read_text()


def test_the_mix_keeps_the_hidden_size_whole_when_the_count_leaves_no_room(tiny_llama):
    from hf_recover.lab import LabPrunings

    prunings = LabPrunings(n_remove=2, width_heads=0.5, width_hidden=0.875)
    # 5 blocks at hidden 28 and 2 heads already hold fewer parameters than the 4-block depth cut (see above)
    with pytest.raises(ValueError, match="already has fewer"):
        width_spec_at_parameters(tiny_llama, parameters_at(tiny_llama, num_layers=4), heads=0.5, hidden_size=0.875,
                                 num_layers=5)  # fmt: skip
    assert prunings.spec("mix") is None  # a family is sized on the teacher
    mix = prunings.spec("mix", tiny_llama)
    assert mix.depth.n == 1 and mix.width.heads == 0.5 and mix.width.hidden_size is None
    width = prunings.spec("width", tiny_llama)  # no block removed: room for every axis
    assert width.width.heads == 0.5 and width.width.hidden_size == 0.875
