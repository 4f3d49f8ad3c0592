"""PrunedConfig: round-trips, composition, validation, and where it is found."""

import json

import pytest

from hf_recover.base.constants import PRUNED_CONFIG_NAME
from hf_recover.base.pruned_config import PrunedConfig


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


# -- find_for: the one way to find a model's PrunedConfig ---------------------------------------------------


def test_find_for_a_folder_given_by_path(tmp_path):
    assert PrunedConfig.find_for(tmp_path) is None  # a folder without pruned_config.json
    config = _config()
    config.save_pretrained(tmp_path)
    assert PrunedConfig.find_for(tmp_path) == config
    assert PrunedConfig.find_for(str(tmp_path)) == config
    with pytest.raises(FileNotFoundError, match="No such folder or file"):
        PrunedConfig.find_for(str(tmp_path / "no" / "such"))


def test_find_for_a_corrupt_file_is_an_error(tmp_path, tiny_llama):
    (tmp_path / "pruned_config.json").write_text('{"teacher_num_layers": 4,')
    with pytest.raises(ValueError):
        PrunedConfig.find_for(tmp_path)
    tiny_llama.config._name_or_path = str(tmp_path)
    with pytest.raises(ValueError):
        PrunedConfig.find_for(tiny_llama)


def test_find_for_a_hub_id_none_only_when_the_file_is_missing(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    calls, raised = [], {}

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        raise raised["error"]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    for error in (EntryNotFoundError("no pruned_config.json"), LocalEntryNotFoundError("offline, not cached")):
        raised["error"] = error
        assert PrunedConfig.find_for("someone/model", revision="v1") is None
    assert calls[0][:2] == ("someone/model", "pruned_config.json") and calls[0][2]["revision"] == "v1"
    raised["error"] = PermissionError("gated repo")  # anything else is not "missing" and must not be hidden
    with pytest.raises(PermissionError):
        PrunedConfig.find_for("someone/model")
    config = _config()
    config.save_pretrained(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(tmp_path / "pruned_config.json"))
    assert PrunedConfig.find_for("someone/model") == config


def test_find_for_a_model_from_the_hub_does_not_ask_the_hub(monkeypatch, tiny_llama):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("asked the Hub"))
    tiny_llama.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert PrunedConfig.find_for(tiny_llama) is None
