"""PrunedConfig: round-trips, composition, validation, and where it is found."""

import json

import pytest

from hf_recover.constants import PRUNED_CONFIG_NAME
from hf_recover.pruned_config import PrunedConfig


def _config(**overrides):
    kwargs = dict(
        teacher_name_or_path="org/teacher",
        teacher_revision="abc123",
        architecture="llama",
        teacher_num_layers=6,
        kept_layer_indices=[0, 1, 3, 5],
        teacher_intermediate_sizes=[64] * 6,
        student_intermediate_sizes=[64] * 4,
        teacher_hidden_size=32,
        student_hidden_size=32,
        teacher_num_parameters=1000,
        student_num_parameters=800,
        steps=[{"type": "depth", "method": "importance", "removed": [2, 4], "scores": [0.5, 0.4, 0.1, 0.3, 0.2, 0.6]}],
        data="256 calibration tokens in 2 sequences",
        license="apache-2.0",
    )
    kwargs.update(overrides)
    return PrunedConfig(**kwargs)


def test_save_and_load_round_trip(tmp_path):
    config = _config()
    path = config.save_pretrained(tmp_path)
    assert path == tmp_path / PRUNED_CONFIG_NAME
    text = path.read_text()
    # sorted, indented JSON, as PEFT configs
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    loaded = PrunedConfig.from_pretrained(tmp_path)
    assert loaded == config
    assert loaded.to_dict() == config.to_dict()
    assert PrunedConfig.from_pretrained(path) == config  # the file itself works too


def test_derived_fields():
    config = _config()
    assert config.removed_layer_indices == [2, 4]
    assert config.num_student_layers == 4
    assert config.layer_map() == [0, 1, 3, 5]
    assert [config.teacher_layer_for(i) for i in range(4)] == [0, 1, 3, 5]
    assert config.pruning_types == ["depth"]
    assert config.method == "depth:importance"
    assert config.to_dict()["removed_layer_indices"] == [2, 4]
    with pytest.raises(ValueError, match="out of range"):
        config.teacher_layer_for(4)


def test_composition_depth_then_width():
    depth = _config()
    width = _config(
        teacher_num_layers=4,
        kept_layer_indices=[0, 1, 2, 3],
        teacher_intermediate_sizes=[64] * 4,
        student_intermediate_sizes=[48, 48, 64, 48],
        teacher_num_parameters=800,
        student_num_parameters=700,
        steps=[{"type": "width", "method": "maw", "scores": []}],
        data=None,
    )
    both = depth.then(width)
    assert both.teacher_num_layers == 6
    assert both.kept_layer_indices == [0, 1, 3, 5]
    assert both.teacher_intermediate_sizes == [64] * 6
    assert both.student_intermediate_sizes == [48, 48, 64, 48]
    assert (both.teacher_num_parameters, both.student_num_parameters) == (1000, 700)
    assert both.pruning_types == ["depth", "width"]
    assert both.method == "depth:importance+width:maw"
    assert both.data == depth.data

    # a second depth pruning of the 4-block student: student block 1 of it is teacher block 3
    again = depth.then(_config(teacher_num_layers=4, kept_layer_indices=[0, 2], student_intermediate_sizes=[64, 64]))
    assert again.kept_layer_indices == [0, 3]
    with pytest.raises(ValueError, match="Cannot compose"):
        depth.then(_config())  # starts from 6 blocks, but depth produced 4


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"kept_layer_indices": [0, 6]}, "outside"),
        ({"kept_layer_indices": [1, 1], "student_intermediate_sizes": [64, 64]}, "duplicates"),
        ({"student_intermediate_sizes": [64]}, "one MLP size per kept block"),
        ({"teacher_num_layers": -1, "kept_layer_indices": []}, ">= 0"),
    ],
)
def test_invalid_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


def test_from_dict_rejects_unknown_and_inconsistent_fields():
    data = _config().to_dict()
    with pytest.raises(ValueError, match="Unknown PrunedConfig fields"):
        PrunedConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError, match="do not match"):
        PrunedConfig.from_dict({**data, "removed_layer_indices": [1]})


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pruned model description"):
        PrunedConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        PrunedConfig.from_pretrained(tmp_path / "nope" / "deeper")


def test_find_for_attached_and_saved(tmp_path, tiny_llama):
    assert PrunedConfig.find_for(tiny_llama) is None
    config = _config()
    config.save_pretrained(tmp_path)
    tiny_llama.config._name_or_path = str(tmp_path)
    assert PrunedConfig.find_for(tiny_llama) == config
    attached = _config(license=None)
    tiny_llama.pruned_config = attached
    assert PrunedConfig.find_for(tiny_llama) is attached
