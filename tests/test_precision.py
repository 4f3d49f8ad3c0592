"""bfloat16 where the hardware has it: the probe, the autocast context, the type a model computes in, evaluation that
follows the run's type (perplexities within a stated tolerance of float32's, cached under their own key), and the
recovery run that says which type it ran in."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_model

import hf_recover.base.precision as precision
import hf_recover.distill.evaluation_cache as evaluation_cache
from hf_recover.base.evaluation import evaluate_perplexity
from hf_recover.base.precision import autocast_to, bf16_supported, compute_dtype


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected", [(False, False, False), (True, False, True), (False, True, True)]
)
def test_the_cpu_has_bf16_when_either_instruction_set_is_there(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert bf16_supported("cpu") is expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert bf16_supported("cuda") is True  # asked without emulation: an Ampere GPU or later
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert bf16_supported("cuda") is False  # emulated only: float32


def test_the_default_follows_the_device_a_trainer_would_pick(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "bf16_supported", lambda device: device == "cpu")
    assert precision.bf16_default() is True
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    assert precision.bf16_default() is False


def test_autocast_to_turns_bf16_on_only_when_asked():
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with autocast_to(False, "cpu"):
        assert not torch.is_autocast_enabled("cpu") and layer(x).dtype == torch.float32
        assert compute_dtype(layer.weight) == torch.float32
    with autocast_to(True, torch.device("cpu")):
        assert layer(x).dtype == torch.bfloat16
        assert compute_dtype(layer.weight) == torch.bfloat16  # float32 weights computed in bfloat16
    assert not torch.is_autocast_enabled("cpu")
    assert compute_dtype(layer.weight.to(torch.float16)) == torch.float16  # weights already low precision: theirs


def test_perplexity_under_bf16_stays_within_a_percent_of_float32_and_is_cached_apart(
    packed_blocks, tmp_path, monkeypatch
):
    data = packed_blocks
    monkeypatch.setenv("HF_RECOVER_CACHE", str(tmp_path))
    model = build_tiny_model(seed=0)
    full, hit = evaluation_cache.cached_perplexity(model, data)
    assert not hit and full == evaluate_perplexity(model, data)["perplexity"]
    with autocast_to(True, "cpu"):
        half, hit = evaluation_cache.cached_perplexity(model, data)
        assert not hit  # the float32 figure is not read back as the bfloat16 one
        assert evaluation_cache.cached_perplexity(model, data) == (half, True)
    assert half != full and math.isclose(half, full, rel_tol=0.01)
    assert evaluation_cache.cached_perplexity(model, data) == (full, True)


def test_with_precision_sets_bf16_and_auto_follows_the_hardware(tmp_path, monkeypatch):
    from hf_recover import DistillationConfig

    config = DistillationConfig(output_dir=str(tmp_path))
    assert precision.with_precision(config, None) is config  # unset: bf16 decides, as in Trainer
    assert precision.with_precision(config, "bfloat16").bf16
    assert not precision.with_precision(config, "float32").bf16
    for native in (True, False):
        monkeypatch.setattr(precision, "bf16_default", lambda native=native: native)
        assert precision.with_precision(config, "auto").bf16 is native
    with pytest.raises(ValueError, match="contradicts --bf16"):
        precision.with_precision(DistillationConfig(output_dir=str(tmp_path), bf16=True), "float32")
    with pytest.raises(ValueError, match="precision takes auto, float32, bfloat16"):
        precision.with_precision(config, "half")
    half = SimpleNamespace(bf16=False, fp16=True, use_cpu=False)  # float16 asked for: auto leaves it alone
    monkeypatch.setattr(precision, "bf16_default", lambda: True)
    assert precision.with_precision(half, "auto") is half
    with pytest.raises(ValueError, match="contradicts --fp16"):
        precision.with_precision(half, "bfloat16")
    on_cpu = SimpleNamespace(bf16=False, fp16=False, use_cpu=True)  # use_cpu: the CPU decides, not a GPU beside it
    monkeypatch.setattr(precision, "bf16_supported", lambda device: device != "cpu")
    assert precision.with_precision(on_cpu, "auto") is on_cpu
