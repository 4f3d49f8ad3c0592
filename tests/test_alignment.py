"""Layer maps (kept, uniform, last, explicit) and the learnable projectors."""

from __future__ import annotations

import pytest
import torch

from hf_recover import PrunedConfig, build_layer_map
from hf_recover.alignment import HiddenProjector, build_projectors


def test_uniform_and_last():
    assert build_layer_map("uniform", student_num_layers=4, teacher_num_layers=8) == [0, 2, 4, 6]
    assert build_layer_map("uniform", student_num_layers=3, teacher_num_layers=8) == [0, 2, 5]
    assert build_layer_map("last", student_num_layers=3, teacher_num_layers=8) == [5, 6, 7]
    assert build_layer_map("uniform", student_num_layers=5, teacher_num_layers=5) == [0, 1, 2, 3, 4]


def test_kept_reads_the_pruned_config():
    pruned = PrunedConfig(teacher_num_layers=6, kept_layer_indices=[0, 2, 3, 5])
    assert build_layer_map("kept", student_num_layers=4, teacher_num_layers=6, pruned_config=pruned) == [0, 2, 3, 5]


def test_kept_without_pruned_config_suggests_alternatives():
    with pytest.raises(ValueError, match="uniform.*last.*explicit"):
        build_layer_map("kept", student_num_layers=4, teacher_num_layers=6)


def test_kept_with_a_mismatched_pruned_config():
    pruned = PrunedConfig(teacher_num_layers=6, kept_layer_indices=[0, 2, 3])
    with pytest.raises(ValueError, match="6-block teacher pruned to 3 blocks"):
        build_layer_map("kept", student_num_layers=4, teacher_num_layers=6, pruned_config=pruned)


def test_explicit():
    assert build_layer_map([0, 0, 5], student_num_layers=3, teacher_num_layers=6) == [0, 0, 5]
    with pytest.raises(ValueError, match=r"valid indices are 0\.\.5"):
        build_layer_map([0, 6, 2], student_num_layers=3, teacher_num_layers=6)
    with pytest.raises(ValueError, match="3 blocks"):
        build_layer_map([0, 1], student_num_layers=3, teacher_num_layers=6)


def test_bad_kinds():
    with pytest.raises(ValueError, match="last"):
        build_layer_map("last", student_num_layers=7, teacher_num_layers=6)
    with pytest.raises(ValueError, match="layer_map"):
        build_layer_map("first", student_num_layers=3, teacher_num_layers=6)


def test_projectors_auto_builds_only_when_widths_differ():
    assert build_projectors("auto", num_student_layers=3, student_hidden_size=32, teacher_hidden_size=32) is None
    assert build_projectors("none", num_student_layers=3, student_hidden_size=32, teacher_hidden_size=32) is None
    projectors = build_projectors("auto", num_student_layers=3, student_hidden_size=16, teacher_hidden_size=32)
    assert len(projectors) == 3
    assert all(p.weight.shape == (32, 16) and p.weight.dtype == torch.float32 for p in projectors)


def test_linear_projectors_start_as_identity_and_cast_to_float32():
    projectors = build_projectors("linear", num_student_layers=2, student_hidden_size=8, teacher_hidden_size=8)
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    out = projectors[1](x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float())


def test_projector_none_with_different_widths_raises():
    with pytest.raises(ValueError, match="projector='auto' or 'linear'"):
        build_projectors("none", num_student_layers=2, student_hidden_size=16, teacher_hidden_size=32)
    with pytest.raises(ValueError, match="projector"):
        build_projectors("mlp", num_student_layers=2, student_hidden_size=16, teacher_hidden_size=32)


def test_projector_is_trainable():
    projector = HiddenProjector(4, 6)
    projector(torch.randn(3, 4)).sum().backward()
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0
