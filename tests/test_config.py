"""DistillationConfig: defaults, command-line and YAML parsing, and every bad configuration."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments

from hf_recover import DistillationConfig

NEW_FIELDS = {
    "alpha",
    "fused_cross_entropy",
    "beta",
    "gamma",
    "delta",
    "temperature",
    "divergence",
    "skew_lambda",
    "jsd_beta",
    "alignment",
    "layer_map",
    "projector",
    "save_projectors",
    "fdd_magnitude_weight",
    "kd_chunk_size",
    "teacher_dtype",
    "merge_adapters",
    "eval_objective_as_loss",
    "fused_lm_head",
    "lmbda",
    "on_policy_max_new_tokens",
    "on_policy_temperature",
    "on_policy_kl_clip",
}


def make(tmp_path, **kwargs) -> DistillationConfig:
    return DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


def test_only_new_fields_each_with_help():
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    new = {f.name: f for f in dataclasses.fields(DistillationConfig) if f.name not in base}
    assert set(new) == NEW_FIELDS
    for name, f in new.items():
        assert f.metadata.get("help"), f"{name} has no help text"
        assert "Default" in f.metadata["help"], f"{name}'s help does not state its default"


def test_defaults(tmp_path):
    config = make(tmp_path)
    assert (config.alpha, config.beta, config.gamma, config.delta, config.temperature) == (0.5, 0.5, 0.0, 0.0, 2.0)
    assert (config.divergence, config.skew_lambda, config.jsd_beta) == ("forward_kl", 0.1, 0.5)
    assert (config.alignment, config.layer_map, config.projector, config.teacher_dtype) == (
        "cosine",
        "kept",
        "auto",
        "auto",
    )
    assert config.kd_chunk_size is None and not config.save_projectors and not config.merge_adapters


def test_command_line(tmp_path):
    parser = HfArgumentParser(DistillationConfig)
    (config,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--report_to",
            "none",
            "--use_cpu",
            "--alpha",
            "0.2",
            "--beta",
            "0.7",
            "--gamma",
            "0.1",
            "--delta",
            "0.3",
            "--temperature",
            "1.5",
            "--divergence",
            "skew_reverse_kl",
            "--skew_lambda",
            "0.3",
            "--layer_map",
            "0,2,4",
            "--projector",
            "linear",
            "--kd_chunk_size",
            "128",
            "--teacher_dtype",
            "bfloat16",
            "--save_projectors",
            "--learning_rate",
            "3e-4",
        ]  # fmt: skip
    )
    assert (config.alpha, config.beta, config.gamma, config.delta, config.temperature) == (0.2, 0.7, 0.1, 0.3, 1.5)
    assert config.divergence == "skew_reverse_kl" and config.skew_lambda == 0.3
    assert config.layer_map == [0, 2, 4]
    assert config.projector == "linear" and config.kd_chunk_size == 128 and config.teacher_dtype == "bfloat16"
    assert config.save_projectors is True and config.learning_rate == 3e-4
    (named,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--layer_map", "last"])
    assert named.layer_map == "last"


def test_yaml(tmp_path):
    path = tmp_path / "recover.yaml"
    path.write_text(
        f"output_dir: {tmp_path / 'out'}\nreport_to: none\nuse_cpu: true\nalpha: 0.3\nbeta: 0.6\ngamma: 0.2\n"
        "delta: 0.1\ndivergence: generalized_jsd\njsd_beta: 0.9\nalignment: mse\nlayer_map: [0, 1, 3]\n"
        "max_steps: 7\n"
    )
    (config,) = HfArgumentParser(DistillationConfig).parse_yaml_file(str(path))
    assert isinstance(config, DistillationConfig)
    assert (config.alpha, config.beta, config.gamma, config.delta) == (0.3, 0.6, 0.2, 0.1)
    assert config.divergence == "generalized_jsd" and config.jsd_beta == 0.9 and config.alignment == "mse"
    assert config.layer_map == [0, 1, 3] and config.max_steps == 7


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"alpha": -0.1}, "alpha"),
        ({"beta": -1.0}, "beta"),
        ({"gamma": -0.5}, "gamma"),
        ({"delta": -0.01}, "delta"),
        ({"fdd_magnitude_weight": -1.0}, "fdd_magnitude_weight"),
        ({"alpha": 0.0, "beta": 0.0}, "all 0"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -2.0}, "temperature"),
        ({"skew_lambda": -0.1}, "skew_lambda"),
        ({"skew_lambda": 1.5}, "skew_lambda"),
        ({"jsd_beta": -0.5}, "jsd_beta"),
        ({"jsd_beta": 1.01}, "jsd_beta"),
        ({"divergence": "kl"}, "divergence"),
        ({"alignment": "l1"}, "alignment"),
        ({"projector": "mlp"}, "projector"),
        ({"layer_map": "first"}, "layer_map"),
        ({"layer_map": "0,-1,2"}, "layer_map"),
        ({"layer_map": [0, 1.5]}, "layer_map"),
        ({"layer_map": ""}, "layer_map"),
        ({"kd_chunk_size": 0}, "kd_chunk_size"),
        ({"teacher_dtype": "int8"}, "teacher_dtype"),
    ],
)
def test_bad_configuration_raises(tmp_path, kwargs, field_name):
    with pytest.raises(ValueError, match=field_name):
        make(tmp_path, **kwargs)


def test_edges_are_valid(tmp_path):
    config = make(tmp_path, alpha=0.0, beta=1.0, skew_lambda=0.0, jsd_beta=1.0, layer_map="[3, 1]")
    assert config.layer_map == [3, 1]
    assert make(tmp_path, alpha=1.0, beta=0.0).beta == 0.0


@pytest.mark.parametrize(
    ("kwargs", "uses_teacher", "wants_hidden_states"),
    [
        ({"alpha": 1.0, "beta": 0.0}, False, False),
        ({"beta": 0.5}, True, False),
        ({"beta": 0.0, "gamma": 0.1}, True, True),
        ({"beta": 0.0, "delta": 0.1}, True, True),
    ],
)
def test_derived_properties(tmp_path, kwargs, uses_teacher, wants_hidden_states):
    config = DistillationConfig(output_dir=str(tmp_path), **kwargs)
    assert config.uses_teacher is uses_teacher
    assert config.wants_hidden_states is wants_hidden_states


@pytest.mark.parametrize(
    ("divergence", "expected"),
    [
        ("forward_kl", {}),
        ("reverse_kl", {}),
        ("skew_forward_kl", {"skew_lambda": 0.3}),
        ("skew_reverse_kl", {"skew_lambda": 0.3}),
        ("generalized_jsd", {"beta": 0.2}),  # the function's keyword, set by the jsd_beta field
        ("total_variation", {}),
    ],
)
def test_divergence_kwargs_come_from_their_fields(tmp_path, divergence, expected):
    config = DistillationConfig(output_dir=str(tmp_path), divergence=divergence, skew_lambda=0.3, jsd_beta=0.2)
    assert config.divergence_kwargs == expected


def test_skew_lambda_one_is_refused_for_both_skew_divergences(tmp_path):
    for divergence in ("skew_forward_kl", "skew_reverse_kl"):
        with pytest.raises(ValueError, match=f"skew_lambda = 1 makes {divergence} identically 0"):
            DistillationConfig(output_dir=str(tmp_path), divergence=divergence, skew_lambda=1.0)
    DistillationConfig(output_dir=str(tmp_path), divergence="forward_kl", skew_lambda=1.0)  # unused: allowed


def test_rows_per_step_counts_every_process_and_accumulation(tmp_path, monkeypatch):
    config = DistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=4, use_cpu=True
    )
    assert config.rows_per_step == 12  # one process
    monkeypatch.setattr(DistillationConfig, "world_size", property(lambda self: 2))
    assert config.rows_per_step == 24


def test_bf16_on_a_machine_without_an_accelerator_trains_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert DistillationConfig(output_dir=str(tmp_path), bf16=True).use_cpu  # Trainer would refuse bf16 without it
    assert not DistillationConfig(output_dir=str(tmp_path)).use_cpu  # float32: nothing changed
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)  # a GPU is there: its own checks decide
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: False)  # an old one
    with pytest.raises(ValueError, match="bf16"):
        DistillationConfig(output_dir=str(tmp_path), bf16=True)
