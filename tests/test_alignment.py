"""Layer maps (kept, uniform, last, explicit), the learnable projectors, and the hidden-state losses (alignment
and feature dynamics) against naive token loops, properties and float64 gradcheck."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs
from torch import nn

from hf_recover import PrunedConfig, build_layer_map
from hf_recover.base.constants import IGNORE_INDEX
from hf_recover.base.losses import forward_kl
from hf_recover.distill.alignment import (
    HiddenProjector,
    LayerPairs,
    build_projectors,
    feature_dynamics_loss,
    hidden_alignment_loss,
    layer_map_pairs,
)


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


def make_hidden(num_blocks, batch=2, seq=9, width=8, dtype=torch.float32):
    return tuple(torch.randn(batch, seq, width, dtype=dtype) for _ in range(num_blocks + 1))


def valid_positions(labels):
    return [
        (b, t) for b in range(labels.size(0)) for t in range(labels.size(1) - 1) if labels[b, t + 1] != IGNORE_INDEX
    ]


def naive_alignment(student_hs, teacher_hs, layer_map, labels, projectors=None, kind="cosine", num_items=None):
    positions = valid_positions(labels)
    pair_values = []
    for i, j in enumerate(layer_map):
        total = 0.0
        for b, t in positions:
            s = student_hs[i + 1][b, t].double()
            if projectors is not None:
                s = projectors[i](s.to(projectors[i].weight.dtype)).double()
            h = teacher_hs[j + 1][b, t].double()
            if kind == "cosine":
                total = total + 1 - (s @ h) / (s.norm() * h.norm())
            else:
                total = total + ((s - h) ** 2).sum() / s.numel()
        pair_values.append(total / max(num_items if num_items is not None else len(positions), 1))
    return sum(pair_values) / len(pair_values)


def naive_dynamics(student_hs, teacher_hs, layer_map, labels, projectors=None, magnitude_weight=0.0):
    positions = valid_positions(labels)
    values = []
    for i in range(len(layer_map) - 1):
        total = 0.0
        for b, t in positions:
            states = [student_hs[k + 1][b, t] for k in (i, i + 1)]
            if projectors is not None:
                states = [projectors[k](state) for k, state in zip((i, i + 1), states)]
            ds = states[1].double() - states[0].double()
            dt = teacher_hs[layer_map[i + 1] + 1][b, t].double() - teacher_hs[layer_map[i] + 1][b, t].double()
            total = total + 1 - (ds @ dt) / (ds.norm() * dt.norm())
            total = total + magnitude_weight * (ds.norm() - dt.norm()).abs() / dt.norm()
        values.append(total / max(len(positions), 1))
    return sum(values) / len(values)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_alignment_matches_naive(kind):
    _, _, labels = make_inputs(2, 9, 5)
    student_hs, teacher_hs = make_hidden(3), make_hidden(6)
    layer_map = [0, 2, 5]
    got = hidden_alignment_loss(student_hs, teacher_hs, layer_map, labels, kind=kind)
    torch.testing.assert_close(got.double(), naive_alignment(student_hs, teacher_hs, layer_map, labels, kind=kind))
    got = hidden_alignment_loss(student_hs, teacher_hs, layer_map, labels, kind=kind, num_items_in_batch=30)
    want = naive_alignment(student_hs, teacher_hs, layer_map, labels, kind=kind, num_items=30)
    torch.testing.assert_close(got.double(), want)


def test_hidden_alignment_with_projectors():
    _, _, labels = make_inputs(2, 9, 5)
    student_hs, teacher_hs = make_hidden(3, width=8), make_hidden(4, width=12)
    projectors = nn.ModuleList(nn.Linear(8, 12) for _ in range(3))
    layer_map = [1, 2, 3]
    got = hidden_alignment_loss(student_hs, teacher_hs, layer_map, labels, projectors=projectors)
    want = naive_alignment(student_hs, teacher_hs, layer_map, labels, projectors=projectors)
    torch.testing.assert_close(got.double(), want)
    # A ModuleDict keyed by student block means the same.
    by_name = nn.ModuleDict({str(i): projector for i, projector in enumerate(projectors)})
    torch.testing.assert_close(
        hidden_alignment_loss(student_hs, teacher_hs, layer_map, labels, projectors=by_name), got
    )
    # The projectors receive gradients.
    got.backward()
    assert all(projector.weight.grad.abs().max() > 0 for projector in projectors)


def test_hidden_alignment_partial_map_and_properties():
    _, _, labels = make_inputs(2, 9, 5)
    student_hs, teacher_hs = make_hidden(4), make_hidden(4)
    # A dict aligns only some blocks: the mean over those pairs.
    partial = hidden_alignment_loss(student_hs, teacher_hs, {1: 3, 3: 0}, labels)
    one = hidden_alignment_loss(student_hs, teacher_hs, {1: 3}, labels)
    other = hidden_alignment_loss(student_hs, teacher_hs, {3: 0}, labels)
    torch.testing.assert_close(partial, (one + other) / 2)
    # Identical states give 0; cosine ignores scale, MSE does not.
    assert hidden_alignment_loss(student_hs, student_hs, [0, 1, 2, 3], labels).abs().item() < 1e-6
    scaled = tuple(3 * h for h in student_hs)
    assert hidden_alignment_loss(student_hs, scaled, [0, 1, 2, 3], labels).abs().item() < 1e-6
    assert hidden_alignment_loss(student_hs, scaled, [0, 1, 2, 3], labels, kind="mse").item() > 1.0


def test_hidden_losses_ignore_masked_positions_and_empty_batch():
    _, _, labels = make_inputs(2, 9, 5)
    student_hs, teacher_hs = make_hidden(3), make_hidden(3)
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:] == IGNORE_INDEX
    ignored[:, -1] = True
    noisy = tuple(h.masked_fill(ignored[..., None], 1e3) for h in student_hs)
    for fn in (hidden_alignment_loss, feature_dynamics_loss):
        torch.testing.assert_close(
            fn(noisy, teacher_hs, [0, 1, 2], labels), fn(student_hs, teacher_hs, [0, 1, 2], labels)
        )
        empty = torch.full_like(labels, IGNORE_INDEX)
        states = tuple(h.clone().requires_grad_() for h in student_hs)
        loss = fn(states, teacher_hs, [0, 1, 2], empty)
        assert loss.item() == 0.0
        loss.backward()
        assert all(torch.equal(h.grad, torch.zeros_like(h)) for h in states[1:])


@pytest.mark.parametrize("magnitude_weight", [0.0, 0.7])
def test_feature_dynamics_matches_naive(magnitude_weight):
    _, _, labels = make_inputs(2, 9, 5)
    student_hs, teacher_hs = make_hidden(4), make_hidden(6)
    layer_map = [0, 1, 3, 5]
    got = feature_dynamics_loss(student_hs, teacher_hs, layer_map, labels, magnitude_weight=magnitude_weight)
    want = naive_dynamics(student_hs, teacher_hs, layer_map, labels, magnitude_weight=magnitude_weight)
    torch.testing.assert_close(got.double(), want)


def test_feature_dynamics_with_projectors():
    _, _, labels = make_inputs(2, 9, 5)
    student_hs, teacher_hs = make_hidden(3, width=6), make_hidden(3, width=10)
    projectors = [nn.Linear(6, 10) for _ in range(3)]
    got = feature_dynamics_loss(student_hs, teacher_hs, [0, 1, 2], labels, projectors=projectors, magnitude_weight=0.5)
    want = naive_dynamics(student_hs, teacher_hs, [0, 1, 2], labels, projectors=projectors, magnitude_weight=0.5)
    torch.testing.assert_close(got.double(), want)


def test_feature_dynamics_properties():
    _, _, labels = make_inputs(2, 9, 5)
    student_hs = make_hidden(4)
    # A teacher whose residual stream moves the same way, c times as far: direction term 0, magnitude |1 − c| / c.
    c = 3.0
    teacher_hs = tuple(c * h + 5.0 for h in student_hs)  # a common offset cancels in the deltas
    layer_map = [0, 1, 2, 3]
    assert feature_dynamics_loss(student_hs, teacher_hs, layer_map, labels).abs().item() < 1e-5
    got = feature_dynamics_loss(student_hs, teacher_hs, layer_map, labels, magnitude_weight=0.5)
    assert got.item() == pytest.approx(0.5 * abs(1 - c) / c, rel=1e-4)
    # FDD sees only the deltas, not where the states sit; alignment does.
    other = tuple(torch.randn_like(h) for h in student_hs)
    shifted = tuple(h + 2.0 for h in other)
    torch.testing.assert_close(
        feature_dynamics_loss(student_hs, shifted, layer_map, labels),
        feature_dynamics_loss(student_hs, other, layer_map, labels),
    )


@pytest.mark.parametrize("loss_name", ["alignment_cosine", "alignment_mse", "dynamics"])
def test_hidden_losses_gradcheck(loss_name):
    _, _, labels = make_inputs(2, 5, 5)
    student_hs, teacher_hs = (
        make_hidden(3, seq=5, width=4, dtype=torch.float64),
        make_hidden(5, seq=5, width=4, dtype=torch.float64),
    )
    layer_map = [0, 2, 4]

    def loss(*states):
        if loss_name == "dynamics":
            return feature_dynamics_loss(states, teacher_hs, layer_map, labels, magnitude_weight=0.3)
        return hidden_alignment_loss(states, teacher_hs, layer_map, labels, kind=loss_name.split("_")[1])

    inputs = tuple(h.clone().requires_grad_() for h in student_hs)
    assert torch.autograd.gradcheck(loss, inputs)


def test_hidden_losses_on_tiny_models(tiny_model_factory):
    student = tiny_model_factory("llama", num_hidden_layers=4, seed=1).train()
    teacher = tiny_model_factory("llama", num_hidden_layers=6, seed=2)
    input_ids = torch.randint(4, 320, (2, 12))
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX
    with torch.no_grad():
        teacher_out = teacher(input_ids, output_hidden_states=True)
    student_out = student(input_ids, output_hidden_states=True)
    layer_map = [0, 2, 4, 5]
    loss = (
        forward_kl(student_out.logits, teacher_out.logits, labels, temperature=2.0)
        + hidden_alignment_loss(student_out.hidden_states, teacher_out.hidden_states, layer_map, labels)
        + feature_dynamics_loss(student_out.hidden_states, teacher_out.hidden_states, layer_map, labels)
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert student.model.layers[0].mlp.up_proj.weight.grad.abs().max() > 0


def test_hidden_losses_bad_inputs():
    _, _, labels = make_inputs(2, 9, 5)
    student_hs, teacher_hs = make_hidden(3), make_hidden(4)
    with pytest.raises(ValueError, match="teacher block 4"):
        hidden_alignment_loss(student_hs, teacher_hs, [0, 1, 4], labels)
    with pytest.raises(ValueError, match="teacher block -1"):
        hidden_alignment_loss(student_hs, teacher_hs, [0, 1, -1], labels)
    with pytest.raises(ValueError, match="student block 3"):
        hidden_alignment_loss(student_hs, teacher_hs, {3: 0}, labels)
    with pytest.raises(ValueError, match="3 blocks"):
        hidden_alignment_loss(student_hs, teacher_hs, [0, 1], labels)
    with pytest.raises(ValueError, match="projectors"):
        hidden_alignment_loss(student_hs, make_hidden(4, width=12), [0, 1, 2], labels)
    with pytest.raises(ValueError, match="projectors"):
        feature_dynamics_loss(student_hs, make_hidden(4, width=12), [0, 1, 2], labels)
    with pytest.raises(ValueError, match="projector"):
        hidden_alignment_loss(student_hs, teacher_hs, [0, 1, 2], labels, projectors=[None])
    with pytest.raises(ValueError, match="kind"):
        hidden_alignment_loss(student_hs, teacher_hs, [0, 1, 2], labels, kind="l1")
    with pytest.raises(ValueError, match="output_hidden_states"):
        hidden_alignment_loss(student_hs[-1], teacher_hs, [0], labels)
    with pytest.raises(ValueError, match="batch, seq_len"):
        hidden_alignment_loss(student_hs, teacher_hs, [0, 1, 2], labels[:, :4])
    with pytest.raises(ValueError, match="at least two"):
        feature_dynamics_loss(student_hs, teacher_hs, {0: 1}, labels)
    with pytest.raises(ValueError, match="magnitude_weight"):
        feature_dynamics_loss(student_hs, teacher_hs, [0, 1, 2], labels, magnitude_weight=-1.0)


def test_a_layer_map_is_validated_once_into_pairs():
    pairs = layer_map_pairs([0, 2, 5], 3, 6)
    assert isinstance(pairs, LayerPairs) and list(pairs) == [(0, 0), (1, 2), (2, 5)]
    assert layer_map_pairs(pairs, 3, 6) is pairs  # validated pairs pass through untouched
    assert list(layer_map_pairs({2: 5, 0: 1}, 3, 6)) == [(0, 1), (2, 5)]
    with pytest.raises(ValueError, match="block indices are ints"):
        layer_map_pairs([0, 1.5, 2], 3, 6)
    with pytest.raises(ValueError, match="block indices are ints"):
        build_layer_map([0, True, 2], student_num_layers=3, teacher_num_layers=6)
    _, _, labels = make_inputs(2, 9, 5)
    student_hs, teacher_hs = make_hidden(3), make_hidden(6)
    torch.testing.assert_close(
        hidden_alignment_loss(student_hs, teacher_hs, pairs, labels),
        hidden_alignment_loss(student_hs, teacher_hs, [0, 2, 5], labels),
    )
