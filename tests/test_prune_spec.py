"""`PruneSpec`: one parser for every form a spec is written in, one validator, one grammar text."""

import json

import pytest

from hf_recover.prune import prune_depth, prune_width
from hf_recover.prune.healing import HealSpec
from hf_recover.prune.spec import PRUNE_SPEC_GRAMMAR, DepthSpec, PruneSpec, WidthSpec

SHORTHANDS = {
    "importance:6": {"depth": {"method": "importance", "n": 6}},
    "remove:3,12": {"depth": {"remove": [3, 12]}},
    "greedy:2:heal=lstsq": {"depth": {"method": "greedy", "n": 2, "heal": "lstsq"}},
    "angular:4+width:vow:0.25": {
        "depth": {"method": "angular", "n": 4},
        "width": {"method": "vow", "pruning_ratio": 0.25},
    },
    "importance:6:heal=cosine": {"depth": {"method": "importance", "n": 6, "heal": "cosine"}},
    "angular:6:heal=local": {"depth": {"method": "angular", "n": 6, "heal": "local"}},
    "remove:3,12:heal=lstsq+width:maw:0.1": {
        "depth": {"remove": [3, 12], "heal": "lstsq"},
        "width": {"method": "maw", "pruning_ratio": 0.1},
    },
    "heads:2": {"width": {"heads": 2}},
    "width:activation:0.2+heads:6:heal=lstsq": {
        "width": {"method": "activation", "pruning_ratio": 0.2, "heads": 6, "heal": "lstsq"}
    },
    "hidden:0.75": {"width": {"hidden_size": 0.75}},
    "heads:6+hidden:540:rotate": {"width": {"heads": 6, "hidden_size": 540, "hidden_method": "rotate"}},
    "importance:2+width:maw:0.25+heads:0.5+hidden:512": {
        "depth": {"method": "importance", "n": 2},
        "width": {"method": "maw", "pruning_ratio": 0.25, "heads": 0.5, "hidden_size": 512},
    },
}


@pytest.mark.parametrize("text, expected", SHORTHANDS.items())
def test_every_form_parses_to_the_same_spec(text, expected):
    spec = PruneSpec.parse(text)
    assert spec.to_dict() == expected
    assert PruneSpec.parse(expected) == spec  # the dict form
    assert PruneSpec.parse(json.dumps(expected)) == spec  # the JSON form
    assert PruneSpec.parse(spec) is spec
    assert str(spec) == text  # the canonical shorthand is what the user wrote
    assert PruneSpec.parse(str(spec)) == spec


def test_settings_without_a_shorthand_print_as_json_that_parses_back():
    spec = PruneSpec(
        depth=DepthSpec(remove=(0,), heal=HealSpec("lstsq", sequential=False)),
        width=WidthSpec(method="activation", expansion_rate=1.0, divisor=8),
    )
    text = str(spec)
    assert json.loads(text) == spec.to_dict()
    assert PruneSpec.parse(text) == spec
    assert spec.to_dict()["depth"]["heal"] == {"method": "lstsq", "sequential": False}


def test_local_heal_options_travel_as_json():
    spec = PruneSpec.parse('{"depth": {"method": "angular", "n": 6, "heal": {"method": "local", "steps": 50}}}')
    assert spec.depth.heal == HealSpec("local", steps=50)
    assert spec.to_dict()["depth"]["heal"] == {"method": "local", "steps": 50}
    assert PruneSpec.parse(str(spec)) == spec


def test_typed_parts_are_frozen_and_normalised():
    spec = PruneSpec.parse({"depth": {"remove": [4, 2]}, "width": {"layers": [1, 0], "heads": 2}})
    assert spec.depth == DepthSpec(remove=(4, 2))
    assert spec.depth.method == "manual" and spec.depth.heal is None
    assert spec.width.layers == (1, 0)
    with pytest.raises(AttributeError):
        spec.depth = None  # frozen
    assert hash(spec.depth) == hash(DepthSpec(remove=[4, 2]))


@pytest.mark.parametrize(
    "text, needs",
    [
        ("last:2", False),
        ("remove:1,2", False),
        ("remove:1,2:heal=lstsq", True),  # scores nothing, but heals on calibration data
        ("importance:2", True),
        ("angular:2", True),
        ("greedy:2", True),
        ("width:maw:0.5", False),
        ("width:maw:0.5:heal=lstsq", True),  # the refit reads calibration activations
        ("width:activation:0.5", True),
        ("heads:2", True),
        ("hidden:16", True),
        ("last:2+width:vow:0.2", False),
    ],
)
def test_needs_calibration_is_decided_in_one_place(text, needs):
    assert PruneSpec.parse(text).needs_calibration is needs


@pytest.mark.parametrize(
    "value, match",
    [
        ("importance:six", "Unknown prune spec part"),
        ("importance:6:heal=svd", "heal takes one of"),
        ("width:maw:0.1:heal=cosine", "width heal takes one of"),
        ("heads:", "Unknown prune spec part"),
        ("hidden:many", "give a count or a fraction"),
        ("heads:1:2", "give a count or a fraction"),
        ("remove:1,x", "comma-separated block indices"),
        ("width:maw:lots", "must be a number"),
        ("width:l2:0.5", "width method must be one of"),
        ("width:maw:1.5", r"must be in \(0, 1\)"),
        ('{"depth": ', "not valid JSON"),
        ('{"depth": {"count": 3}}', r"'depth' has unknown key\(s\) \['count'\]"),
        ('{"depth": {"n": 0}}', "depth n must be a number of blocks >= 1"),
        ('{"depth": {"n": 2, "remove": [1]}}', "not both"),
        ('{"depth": {"n": 2, "heal": {"method": "lstsq", "steps": 3}}}', "are for method 'local'"),
        ('{"depth": {"n": 2, "heal": {"method": "local", "epochs": 3}}}', r"heal has unknown key\(s\) \['epochs'\]"),
        ('{"width": {"pruning_ratio": 0.2, "expansion_rate": 2.0}}', "exactly one of"),
        ("{}", "a dict with keys 'depth' and/or 'width'"),
        ("", "A prune spec is a string"),
        ("importance:2+last:1", "two depth parts, 'importance:2' and 'last:1'"),
        ("remove:1+angular:2", "two depth parts"),
        ("heads:2+heads:0.5", "two heads parts, 'heads:2' and 'heads:0.5'"),
        ("width:maw:0.1+width:vow:0.2", "two width parts"),
        ("hidden:16:heal=lstsq", "nothing would be refitted"),
        ('{"width": {"pruning_ratio": 0.2, "hidden_method": "rotate"}}', "nothing would be rotated"),
    ],
)
def test_bad_specs_say_what_is_wrong(value, match):
    with pytest.raises(ValueError, match=match):
        PruneSpec.parse(value)


def test_an_unknown_part_shows_the_grammar():
    with pytest.raises(ValueError) as error:
        PruneSpec.parse("depth:6")
    assert PRUNE_SPEC_GRAMMAR in str(error.value)


def test_check_against_a_model_before_any_work(tiny_llama):
    PruneSpec.parse("last:2").check(tiny_llama)
    with pytest.raises(ValueError, match="n must be an int in 1..5"):
        PruneSpec.parse("last:6").check(tiny_llama)
    with pytest.raises(ValueError, match="outside"):
        PruneSpec.parse("remove:9").check(tiny_llama)
    with pytest.raises(ValueError, match="pass data="):
        PruneSpec.parse("importance:2").check(tiny_llama)
    with pytest.raises(ValueError, match="pass data="):
        PruneSpec.parse("remove:1:heal=lstsq").check(tiny_llama)
    with pytest.raises(ValueError, match="positive multiple of 2"):  # tiny models have 2 KV heads
        PruneSpec.parse("heads:3").check(tiny_llama, data=[{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="outside"):  # the width part sees the blocks the depth part leaves
        PruneSpec.parse({"depth": {"method": "last", "n": 2}, "width": {"pruning_ratio": 0.5, "layers": [4]}}).check(
            tiny_llama
        )


def test_build_equals_the_pruning_functions(tiny_llama):

    student, config = PruneSpec.parse("remove:1,2+width:vow:0.5").build(tiny_llama)
    direct, _ = prune_depth(tiny_llama, remove=[1, 2])
    direct, direct_config = prune_width(direct, pruning_ratio=0.5, method="vow")
    assert config.to_dict() == direct_config.to_dict()
    for (name, a), (_, b) in zip(student.state_dict().items(), direct.state_dict().items()):
        assert a.equal(b), name
    assert all(p.requires_grad for p in student.parameters())  # a copy ready to train
    assert len(tiny_llama.model.layers) == 6  # the teacher is untouched


@pytest.mark.parametrize("command", ["prune", "select", "recover", "demo", "compare"])
def test_every_command_that_takes_specs_shows_the_one_grammar(command):
    from hf_recover.cli import command_module

    parser = command_module(command).make_parser()
    assert PRUNE_SPEC_GRAMMAR in parser.format_help()


WIDTH_RULES = [
    {"pruning_ratio": 0.5, "heal": "svd"},
    {"pruning_ratio": 0.5, "hidden_method": "twist"},
    {"hidden_size": 16, "heal": "lstsq"},
    {"pruning_ratio": 0.5, "expansion_rate": 1.0},
    {"pruning_ratio": 0.25, "hidden_method": "rotate"},
]
DEPTH_RULES = [
    {"n": 2, "method": "random"}, {"remove": [1], "n": 1}, {}, {"n": 0}, {"remove": []}, {"n": 2, "heal": "x"}
]  # fmt: skip


@pytest.mark.parametrize(
    "part, prune, kwargs",
    [(WidthSpec, prune_width, kwargs) for kwargs in WIDTH_RULES]
    + [(DepthSpec, prune_depth, kwargs) for kwargs in DEPTH_RULES],
)
def test_the_prune_functions_refuse_by_their_specs_own_rules(tiny_llama, part, prune, kwargs):
    """One home for each rule: `prune_width` / `prune_depth` build their `WidthSpec` / `DepthSpec` and say what the
    spec says, before touching the model."""
    with pytest.raises(ValueError) as from_spec:
        part(**kwargs)
    with pytest.raises(ValueError) as direct:
        prune(tiny_llama, inplace=True, **kwargs)
    assert str(direct.value) == str(from_spec.value)
    assert len(tiny_llama.model.layers) == 6 and tiny_llama.model.layers[0].mlp.up_proj.out_features == 64


def test_depth_and_width_take_one_heal_type(tiny_llama):
    """A width part's heal is a `HealSpec`, as a depth part's: given by its method name, a dict or the object, it is
    the same spec, written back as the method name."""
    rows = [{"input_ids": list(range(3, 19)), "attention_mask": [1] * 16, "labels": list(range(3, 19))}] * 2
    forms = [WidthSpec(pruning_ratio=0.5, heal=h) for h in ("lstsq", {"method": "lstsq"}, HealSpec("lstsq"))]
    assert forms[0] == forms[1] == forms[2] and isinstance(forms[0].heal, HealSpec)
    assert forms[0].to_dict() == {"method": "maw", "pruning_ratio": 0.5, "heal": "lstsq"}
    assert str(PruneSpec(width=forms[0])) == "width:maw:0.5:heal=lstsq"
    assert PruneSpec.parse("width:maw:0.5:heal=lstsq").width == forms[0]
    by_name, _ = prune_width(tiny_llama, pruning_ratio=0.5, heal="lstsq", data=rows)
    by_spec, config = prune_width(tiny_llama, pruning_ratio=0.5, heal=HealSpec("lstsq"), data=rows)
    assert config.steps[-1]["heal"]["method"] == "lstsq"
    for a, b in zip(by_name.parameters(), by_spec.parameters(), strict=True):
        assert a.equal(b)
    with pytest.raises(ValueError, match="takes no setting but its method"):
        WidthSpec(pruning_ratio=0.5, heal=HealSpec("lstsq", sequential=False))
