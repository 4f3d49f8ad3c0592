"""The pruned start is built once: a second build of the same spec from the same teacher and calibration reads it
back, equal to the one built (weights, configuration, PrunedConfig, outputs); anything else is built again."""

import pytest
import torch
from conftest import build_tiny_model

from hf_recover.distill.evaluation_cache import model_fingerprint
from hf_recover.prune.spec import PruneSpec
from hf_recover.starts import FOLDER, cached_build


@pytest.fixture
def calibration(packed_blocks):
    return packed_blocks


def test_a_second_build_reads_the_same_start_back(calibration, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_RECOVER_CACHE", str(tmp_path))
    teacher, spec = build_tiny_model(seed=0), PruneSpec.parse("angular:2:heal=lstsq")
    built, built_config, hit = cached_build(spec, teacher, calibration)
    assert not hit and len(built.model.layers) == len(teacher.model.layers) - 2

    monkeypatch.setattr(PruneSpec, "build", lambda *a, **k: pytest.fail("built again"))
    read, read_config, hit = cached_build(spec, teacher, calibration)
    assert hit and read_config.to_dict() == built_config.to_dict()
    assert model_fingerprint(read) == model_fingerprint(built)  # the perplexity cache knows it for the same model
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    torch.testing.assert_close(read(ids).logits, built(ids).logits, rtol=0, atol=0)

    teacher.requires_grad_(False)  # a frozen teacher (as a trainer leaves it): the start trains all the same
    assert all(p.requires_grad for p in cached_build(spec, teacher, calibration)[0].parameters())
    teacher.requires_grad_(True)

    for other_spec, other_data in (
        (PruneSpec.parse("angular:1:heal=lstsq"), calibration),
        (spec, calibration.select([0])),
    ):
        with pytest.raises(pytest.fail.Exception, match="built again"):
            cached_build(other_spec, teacher, other_data)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(2)
    with pytest.raises(pytest.fail.Exception, match="built again"):
        cached_build(spec, teacher, calibration)


def test_a_damaged_start_is_built_again(calibration, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_RECOVER_CACHE", str(tmp_path))
    teacher, spec = build_tiny_model(seed=0), PruneSpec.parse("last:2")
    first, _, _ = cached_build(spec, teacher, calibration)
    (entry,) = (tmp_path / FOLDER).iterdir()
    (entry / "model.safetensors").write_bytes(b"not weights")
    again, _, hit = cached_build(spec, teacher, calibration)
    assert not hit and model_fingerprint(again) == model_fingerprint(first)
    assert cached_build(spec, teacher, calibration)[2]  # whole again: read back
