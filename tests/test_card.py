"""Model cards: rendering, README merging, and the card the trainer writes next to every save.

Sockets are closed for the whole module, so nothing can reach the network.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from importlib import resources
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TEXTS, build_tiny_model, build_tiny_tokenizer, make_args
from datasets import Dataset
from huggingface_hub import ModelCard, metadata_load

from hf_recover import (
    DistillationConfig,
    DistillationTrainer,
    PrunedConfig,
    generate_model_card,
    prepare_recovery_dataset,
    prune_depth,
    save_model_card,
)
from hf_recover.base.evaluation import recovery_metrics
from hf_recover.publish.card import CARD_METRICS
from hf_recover.publish.card_merge import BEGIN_MARKER, END_MARKER

TEACHER = "HuggingFaceTB/SmolLM2-135M-Instruct"

FULL_METRICS = {
    "perplexity": {
        "validation": {"teacher": 22.5, "pruned": 46.5, "recovered": 25.6},
        "ood": {"teacher": 13.8, "pruned": 40.3, "recovered": 26.9},
    },
    "train_steps": 60,
    "train_tokens": 61440,
    "train_runtime": 490.0,
    "teacher_parameters": 134515008,
    "student_parameters": 106000000,
}
FULL_CONFIG = {
    "alpha": 0.5,
    "beta": 0.5,
    "gamma": 0.1,
    "delta": 0.05,
    "temperature": 2.0,
    "divergence": "skew_forward_kl",
    "skew_lambda": 0.1,
    "jsd_beta": 0.5,
    "alignment": "cosine",
    "layer_map": "kept",
    "projector": "auto",
    "learning_rate": 1e-4,
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "seed": 42,
}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def depth_pruned_config(**overrides) -> PrunedConfig:
    """8-block teacher -> the 6-block tiny model (blocks 3 and 5 removed), MLP 64 everywhere."""
    values = dict(
        teacher_name_or_path=TEACHER,
        architecture="LlamaForCausalLM",
        teacher_num_layers=8,
        kept_layer_indices=[0, 1, 2, 4, 6, 7],
        teacher_intermediate_sizes=[64] * 8,
        student_intermediate_sizes=[64] * 6,
        teacher_hidden_size=32,
        student_hidden_size=32,
        teacher_num_parameters=134515008,
        student_num_parameters=106000000,
        steps=[{"type": "depth", "method": "block_influence"}],
        data="WEB bible, 32 sequences of 512 tokens",
        license="apache-2.0",
    )
    values.update(overrides)
    return PrunedConfig(**values)


def width_pruned_config() -> PrunedConfig:
    """6 blocks kept, MLP sizes differ per block (width pruning only)."""
    return PrunedConfig(
        teacher_name_or_path=TEACHER,
        teacher_num_layers=6,
        kept_layer_indices=list(range(6)),
        teacher_intermediate_sizes=[64] * 6,
        student_intermediate_sizes=[48, 40, 64, 32, 56, 48],
        teacher_hidden_size=32,
        student_hidden_size=32,
        steps=[{"type": "width", "method": "maw", "pruning_ratio": 0.25}],
    )


def assert_clean(text: str) -> None:
    assert "None" not in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert "{{" not in text and "{%" not in text


# -- rendering ---------------------------------------------------------------------------------------------


def test_template_ships_with_the_package():
    template = resources.files("hf_recover.model_cards").joinpath("recovered_model.md")
    assert template.is_file()
    source = template.read_text(encoding="utf-8")
    assert source.count(BEGIN_MARKER) == source.count(END_MARKER) == 1


def test_full_card(tmp_path):
    card = generate_model_card(
        pruned_config=depth_pruned_config(),
        config=FULL_CONFIG,
        metrics=FULL_METRICS,
        datasets=["wikimedia/wikipedia", "World English Bible (Debian sword-text-web)"],
        model_name="SmolLM2-24L-recovered",
        hub_model_id="me/SmolLM2-24L-recovered",
    )
    assert isinstance(card, ModelCard)
    text = str(card)
    assert_clean(text)

    # the YAML header parses with huggingface_hub, from the card and from a saved file
    path = tmp_path / "README.md"
    card.save(path)
    for meta in (card.data.to_dict(), metadata_load(path)):
        assert meta["base_model"] == TEACHER
        assert meta["library_name"] == "transformers"
        assert meta["pipeline_tag"] == "text-generation"
        assert meta["license"] == "apache-2.0"
        assert meta["datasets"] == ["wikimedia/wikipedia"]  # free text stays out of the metadata
        assert meta["tags"] == ["hf-recover", "pruned", "depth-pruning", "knowledge-distillation"]

    body = card.text
    assert body.lstrip().startswith("# SmolLM2-24L-recovered")
    assert "World English Bible (Debian sword-text-web)" in body
    assert "[wikimedia/wikipedia](https://huggingface.co/datasets/wikimedia/wikipedia)" in body
    # the loss configuration
    assert "`α·CE + β·T²·KD + γ·align + δ·FDD`" in body
    for expected in ("α = 0.5", "β = 0.5", "γ = 0.1", "δ = 0.05", "T = 2", "skew λ = 0.1", "`skew_forward_kl`"):
        assert expected in body
    assert "JSD" not in body  # jsd_beta only matters for generalized_jsd
    assert "teacher blocks [0, 1, 2, 4, 6, 7]" in body  # the kept layer map, resolved
    # data and budget
    for expected in ("Optimizer steps: 60", "Training tokens: 61,440", "Training time: 8 min 10 s"):
        assert expected in body
    assert "Batch size: 8 sequences per step (4 per device × 2 accumulation steps)" in body
    # parameters before/after, from the metrics
    assert "Parameters: 134.5M → 106.0M (-21.2%)" in body
    # the before/after table, recovery computed with recovery_metrics
    validation = recovery_metrics(22.5, 46.5, 25.6)
    ood = recovery_metrics(13.8, 40.3, 26.9)
    recovery, retention = f"{validation['recovery']:.1%}", f"{validation['retention']:.1%}"
    assert f"| validation | 22.50 | 46.50 | 25.60 | {recovery} | {retention} |" in body
    assert f"| ood | 13.80 | 40.30 | 26.90 | {ood['recovery']:.1%} | {ood['retention']:.1%} |" in body
    assert "87.1%" in body and "50.6%" in body
    # usage: a normal (uniform) model loads with transformers, from the Hub id
    assert 'model_id = "me/SmolLM2-24L-recovered"' in body
    assert "AutoModelForCausalLM.from_pretrained(model_id)" in body
    assert body.count(BEGIN_MARKER) == body.count(END_MARKER) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"metrics": {}},
        {"metrics": {"perplexity": {"validation": {"teacher": 22.5, "recovered": 25.6}}}},
        {"metrics": {"perplexity": {"validation": {"pruned": 46.5}}, "train_steps": 3}},
        {"metrics": {"train_runtime": 12.3, "student_parameters": 1000}, "config": {"alpha": 1.0}},
        {
            "pruned_config": {
                "teacher_name_or_path": "/local/teacher",
                "teacher_num_layers": 4,
                "kept_layer_indices": [0],
            }
        },
        {"config": {"beta": 1.0, "divergence": None, "temperature": None, "layer_map": None}},
        {"datasets": "a description of local text files", "model_name": "m"},
    ],
)
def test_partial_card_leaves_missing_values_out(kwargs):
    card = generate_model_card(**kwargs)
    text = str(card)
    assert_clean(text)
    meta = yaml.safe_load(text.split("---")[1])
    assert meta == card.data.to_dict()
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert "hf-recover" in meta["tags"]
    assert "license" not in meta and "datasets" not in meta  # unknown: left out, not empty
    assert "base_model" not in meta  # no teacher, or a local path that is not a Hub id
    assert "## Usage" in text
    assert "|  |" not in text and ": \n" not in text  # no empty cell or empty "key: value" line
    metrics = kwargs.get("metrics") or {}
    has_ppl = bool(metrics.get("perplexity"))
    assert ("## Results" in text) == has_ppl
    assert ("## How it was recovered" in text) == bool(kwargs.get("config"))


def test_partial_perplexities_give_partial_rows():
    metrics = {"perplexity": {"validation": {"teacher": 20.0, "recovered": 25.0}, "ood": {"pruned": 1573730.0}}}
    body = generate_model_card(metrics=metrics).text
    assert "| validation | 20.00 | — | 25.00 | — | 80.0% |" in body  # retention needs no pruned PPL
    assert "| ood | — | 1,573,730 | — | — | — |" in body


def test_depth_pruned_card():
    card = generate_model_card(pruned_config=depth_pruned_config())
    meta, body = card.data.to_dict(), card.text
    assert meta["tags"] == ["hf-recover", "pruned", "depth-pruning", "knowledge-distillation"]
    assert meta["base_model"] == TEACHER and meta["license"] == "apache-2.0"
    assert "Blocks: 6 of the teacher's 8 transformer blocks kept" in body
    assert "Kept teacher blocks: [0, 1, 2, 4, 6, 7]" in body
    assert "Removed teacher blocks: [3, 5]" in body
    assert "depth pruning (method `block_influence`)" in body
    assert "Calibration data: WEB bible, 32 sequences of 512 tokens" in body
    assert "Parameters: 134.5M → 106.0M" in body  # from the PrunedConfig when metrics have none
    assert "student MLP" not in body  # MLP sizes untouched: no per-block table
    assert "AutoModelForCausalLM.from_pretrained" in body and "load_pruned" not in body
    assert_clean(str(card))


def test_width_pruned_card():
    card = generate_model_card(pruned_config=width_pruned_config(), hub_model_id="me/narrow")
    meta, body = card.data.to_dict(), card.text
    assert meta["tags"] == ["hf-recover", "pruned", "width-pruning", "knowledge-distillation"]
    assert "Removed teacher blocks" not in body
    assert "width pruning (method `maw`, pruning ratio 0.25)" in body
    assert "| student block | teacher block | teacher MLP | student MLP | kept |" in body
    rows = [line for line in body.splitlines() if line.startswith("| ") and line.endswith("% |")]
    assert rows == [
        "| 0 | 0 | 64 | 48 | 75% |",
        "| 1 | 1 | 64 | 40 | 62% |",
        "| 2 | 2 | 64 | 64 | 100% |",
        "| 3 | 3 | 64 | 32 | 50% |",
        "| 4 | 4 | 64 | 56 | 88% |",
        "| 5 | 5 | 64 | 48 | 75% |",
    ]
    # unequal MLP sizes do not fit one `intermediate_size`: the snippet loads through hf_recover
    assert "from hf_recover import load_pruned" in body and "load_pruned(model_id)" in body
    assert "AutoModelForCausalLM" not in body
    assert_clean(str(card))


def test_depth_then_width_and_distillation_off():
    depth = depth_pruned_config()
    width = PrunedConfig(
        teacher_num_layers=6,
        kept_layer_indices=list(range(6)),
        teacher_intermediate_sizes=[64] * 6,
        student_intermediate_sizes=[32] * 6,
        steps=[{"type": "width", "method": "vow"}],
    )
    card = generate_model_card(pruned_config=depth.then(width), config={"alpha": 1.0, "beta": 0.0, "gamma": 0.0})
    meta, body = card.data.to_dict(), card.text
    # a CE-only run is plain fine-tuning: no knowledge-distillation tag, no KD row
    assert meta["tags"] == ["hf-recover", "pruned", "depth-pruning", "width-pruning"]
    assert "depth pruning (method `block_influence`), then width pruning (method `vow`)" in body
    assert "`α·CE`" in body and "β =" not in body
    assert "| 3 | 4 | 64 | 32 | 50% |" in body
    assert "AutoModelForCausalLM" in body  # equal sizes everywhere load with transformers


def test_card_reads_a_distillation_config(tmp_path):
    from hf_recover import DistillationConfig

    args = DistillationConfig(
        output_dir=str(tmp_path),
        alpha=0.3,
        beta=0.7,
        temperature=4.0,
        divergence="generalized_jsd",
        jsd_beta=0.25,
        learning_rate=3e-5,
        report_to="none",
        use_cpu=True,
    )
    body = generate_model_card(config=args, pruned_config=depth_pruned_config()).text
    assert "α = 0.3" in body and "β = 0.7" in body and "T = 4" in body
    assert "`generalized_jsd`" in body and "JSD β = 0.25" in body
    assert "skew λ" not in body
    assert "Learning rate: 3e-05, `linear` schedule" in body  # the enum's value, not its repr
    assert_clean(body)


@pytest.mark.parametrize(
    "divergence",
    ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "generalized_jsd", "total_variation"],
)
def test_kd_row_reads_the_divergence_table(tmp_path, divergence):
    from hf_recover.base.losses import DIVERGENCES

    entry = DIVERGENCES[divergence]
    args = DistillationConfig(output_dir=str(tmp_path), divergence=divergence, report_to="none", use_cpu=True)
    body = generate_model_card(config=args).text
    (row,) = [line for line in body.splitlines() if line.startswith("| distillation (KD) |")]
    details = row.split(" | ")[2]
    assert f"`{divergence}`" in details and entry.source in details
    assert entry.formula.replace("|", "\\|") in details  # a pipe would end the table cell
    for param in entry.params:
        assert f" {param.symbol} = {getattr(args, param.field):g}" in details
    if not entry.params:
        assert " = " not in details.replace("T = ", "")  # no parameter of another divergence


def test_distillation_tag_follows_the_config(tmp_path):
    from transformers import TrainingArguments

    def tags(config):
        return generate_model_card(config=config).data.tags

    ce_only = DistillationConfig(output_dir=str(tmp_path), alpha=1.0, beta=0.0, report_to="none", use_cpu=True)
    assert not ce_only.uses_teacher and "knowledge-distillation" not in tags(ce_only)
    assert "knowledge-distillation" in tags(DistillationConfig(output_dir=str(tmp_path), report_to="none"))
    # no teacher weights given: hf_recover's default recipe, which distils
    assert "knowledge-distillation" in tags(TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    assert "knowledge-distillation" in tags(None)

    class Declared:  # a config that says itself whether it uses a teacher is believed
        uses_teacher = False
        beta = 1.0

    assert "knowledge-distillation" not in tags(Declared())


def test_generate_is_pure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pruned = depth_pruned_config()
    before = pruned.to_dict()
    first = str(generate_model_card(pruned_config=pruned, config=FULL_CONFIG, metrics=FULL_METRICS))
    second = str(generate_model_card(pruned_config=pruned, config=FULL_CONFIG, metrics=FULL_METRICS))
    assert first == second
    assert pruned.to_dict() == before
    assert list(tmp_path.iterdir()) == []


def test_bad_pruned_config_type():
    with pytest.raises(ValueError, match="pruned_config must be a PrunedConfig"):
        generate_model_card(pruned_config=42)


# -- save_model_card: write and merge ----------------------------------------------------------------------


def test_save_model_card_writes_readme_and_reads_the_saved_pruned_config(tmp_path):
    depth_pruned_config().save_pretrained(tmp_path)
    path = save_model_card(tmp_path, metrics=FULL_METRICS)
    assert path == tmp_path / "README.md"
    meta = metadata_load(path)
    assert meta["base_model"] == TEACHER and "depth-pruning" in meta["tags"]
    assert "Removed teacher blocks: [3, 5]" in path.read_text(encoding="utf-8")


USER_README = """---
language: en
license: mit
tags:
- my-tag
- pruned
custom_key: keep me
---

# My own title

Notes the user wrote by hand.
"""


def test_existing_readme_is_merged_not_clobbered(tmp_path):
    (tmp_path / "README.md").write_text(USER_README, encoding="utf-8")
    save_model_card(tmp_path, pruned_config=depth_pruned_config(), metrics=FULL_METRICS)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    meta = metadata_load(tmp_path / "README.md")
    # metadata merged: theirs kept where we have nothing, ours fills, tags unioned (theirs first, no duplicates)
    assert meta["language"] == "en"
    assert meta["custom_key"] == "keep me"
    assert meta["base_model"] == TEACHER
    assert meta["license"] == "apache-2.0"
    assert meta["tags"] == ["my-tag", "pruned", "hf-recover", "depth-pruning", "knowledge-distillation"]
    assert list(meta)[:4] == ["language", "license", "tags", "custom_key"]  # their key order kept
    # the user's text kept, our section appended once
    body = text.split("---", 2)[2]
    assert body.lstrip().startswith("# My own title\n\nNotes the user wrote by hand.\n")
    assert body.count(BEGIN_MARKER) == 1 and body.count(END_MARKER) == 1
    assert "87.1%" in body

    # the user edits around our section; the next save replaces only the section
    text = text.replace("Notes the user wrote by hand.", "Edited notes.") + "\nA footer after our section.\n"
    (tmp_path / "README.md").write_text(text, encoding="utf-8")
    new_metrics = {"perplexity": {"validation": {"teacher": 22.5, "pruned": 46.5, "recovered": 30.0}}}
    save_model_card(tmp_path, pruned_config=depth_pruned_config(), metrics=new_metrics)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "Edited notes." in text and text.rstrip().endswith("A footer after our section.")
    assert text.count(BEGIN_MARKER) == 1 and text.count("# My own title") == 1
    assert "87.1%" not in text and f"{recovery_metrics(22.5, 46.5, 30.0)['recovery']:.1%}" in text
    assert metadata_load(tmp_path / "README.md")["custom_key"] == "keep me"


def test_our_own_card_is_replaced_on_the_next_save(tmp_path):
    save_model_card(tmp_path, model_name="first", metrics={"train_steps": 10})
    save_model_card(tmp_path, model_name="second", metrics={"train_steps": 20})
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "Optimizer steps: 20" in text and "Optimizer steps: 10" not in text
    assert text.count(BEGIN_MARKER) == 1
    assert "# first" in text  # the title is outside our section: it is the user's after the first save
    assert metadata_load(tmp_path / "README.md")["tags"] == ["hf-recover", "knowledge-distillation"]


@pytest.mark.parametrize(
    "content",
    [
        f"# Mine\n\n{BEGIN_MARKER}\nhalf a section, no end marker\n",
        f"# Mine\n\n{END_MARKER}\n{BEGIN_MARKER}\n",
        "---\nlicense: [unclosed\n---\n# Mine\n",
    ],
)
def test_readme_that_cannot_be_merged_is_left_alone(tmp_path, caplog, content):
    (tmp_path / "README.md").write_text(content, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="hf_recover.publish.card"):
        save_model_card(tmp_path, pruned_config=depth_pruned_config())
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == content
    assert "Not updating" in caplog.text


def test_save_model_card_refuses_a_file(tmp_path):
    (tmp_path / "model").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        save_model_card(tmp_path / "model")


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({"teacher_perplexity": 22.5}, r"does not know: \['teacher_perplexity'\]\. Known keys: \['perplexity', "),
        (
            {"perplexity": {"validation": {"teacher": 22.5, "student": 25.6}}},
            r"\['validation'\] names models the model card does not know: \['student'\]\. Known models: ",
        ),
    ],
    ids=["metric", "perplexity-model"],
)
def test_unknown_metrics_are_refused_with_the_known_keys(tmp_path, metrics, match):
    with pytest.raises(ValueError, match=match) as info:
        generate_model_card(metrics=metrics)
    if "teacher_perplexity" in metrics:
        assert all(repr(key) in str(info.value) for key in CARD_METRICS)
    with pytest.raises(ValueError, match=match):
        save_model_card(tmp_path, metrics=metrics)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


def test_recovery_result_metrics_are_all_known():
    from test_reporting import a_recovery_result

    result = a_recovery_result()
    assert set(result.card_metrics()) == set(CARD_METRICS)
    assert (
        "| validation | 16.08 | 41.40 | 18.80 | 89.3% | 85.5% |"
        in generate_model_card(metrics=result.card_metrics()).text
    )


# -- with the real pruning functions -------------------------------------------------------------------------


@pytest.fixture
def depth_then_width_model():
    from hf_recover import prune_depth, prune_width

    model, _ = prune_depth(build_tiny_model(), remove=[1, 4])
    return prune_width(model, pruning_ratio=0.25, layers=[0, 2])


def test_card_of_a_model_pruned_by_hf_recover(depth_then_width_model):
    _, pruned = depth_then_width_model
    card = generate_model_card(pruned_config=pruned)
    body = card.text
    assert card.data.tags == ["hf-recover", "pruned", "depth-pruning", "width-pruning", "knowledge-distillation"]
    assert "structurally pruned (depth pruning and width pruning)" in body  # no teacher name: built from a config
    assert "removed blocks [1, 4]" in body and "pruning ratio 0.25, blocks [0, 2]" in body
    assert "Kept teacher blocks: [0, 2, 3, 5]" in body and "Removed teacher blocks: [1, 4]" in body
    assert "| 0 | 0 | 64 | 48 | 75% |" in body and "| 3 | 5 | 64 | 64 | 100% |" in body
    assert (
        f"Parameters: {pruned.teacher_num_parameters / 1e3:.1f}K → {pruned.student_num_parameters / 1e3:.1f}K" in body
    )
    assert "load_pruned(model_id)" in body
    assert_clean(str(card))


# -- the trainer's save hooks ------------------------------------------------------------------------------


METRICS = {"perplexity": {"validation": {"teacher": 22.5, "pruned": 46.5, "recovered": 25.6}}, "train_steps": 2}


@pytest.fixture(scope="module")
def tiny_dataset():
    return prepare_recovery_dataset(
        Dataset.from_dict({"text": TINY_TEXTS * 2}), build_tiny_tokenizer(), max_length=24, packing=False
    )


@pytest.fixture
def trainer(tmp_path, tiny_dataset):
    teacher = build_tiny_model()
    teacher.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # as the embedded teacher names itself
    student, _ = prune_depth(teacher, remove=[1, 4])
    args = make_args(
        tmp_path, max_steps=2, save_strategy="steps", save_steps=2, temperature=2.0, hub_model_id="me/tiny-recovered"
    )
    return DistillationTrainer(
        student, teacher, args, train_dataset=tiny_dataset, processing_class=build_tiny_tokenizer()
    )


def test_every_save_writes_card_pruned_config_and_tokenizer(trainer, tmp_path):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)  # Trainer may have made it already
    (out / "README.md").write_text("---\nlanguage: en\n---\n# Our tiny model\n\nHand-written notes.\n")
    trainer.train()
    trainer.model_card_metrics = METRICS
    trainer.model_card_datasets = ["World English Bible (Debian sword-text-web)"]
    trainer.save_model()

    checkpoint = out / "checkpoint-2"
    for folder in (out, checkpoint):
        for name in ("README.md", "pruned_config.json", "tokenizer.json", "tokenizer_config.json", "config.json"):
            assert (folder / name).is_file(), folder / name
        meta = metadata_load(folder / "README.md")
        assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert meta["tags"][:3] == ["hf-recover", "pruned", "depth-pruning"]
        card = (folder / "README.md").read_text(encoding="utf-8")
        assert "Removed teacher blocks: [1, 4]" in card
        assert "α = 0.5" in card and "β = 0.5" in card and "T = 2" in card
        assert json.loads((folder / "pruned_config.json").read_text())["kept_layer_indices"] == [0, 2, 3, 5]

    # the user's README in the output folder was merged, not clobbered
    final = (out / "README.md").read_text(encoding="utf-8")
    assert "# Our tiny model\n\nHand-written notes." in final and final.count(BEGIN_MARKER) == 1
    assert metadata_load(out / "README.md")["language"] == "en"
    # the final save carries the metrics and datasets set after training
    assert "| validation | 22.50 | 46.50 | 25.60 | 87.1% | 87.9% |" in final
    assert "World English Bible (Debian sword-text-web)" in final
    assert 'model_id = "me/tiny-recovered"' in final


def test_unknown_card_metrics_fail_when_set_on_the_trainer(tmp_path, tiny_dataset):
    from hf_recover import DistillationConfig, DistillationTrainer

    args = DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, alpha=1.0, beta=0.0)
    trainer = DistillationTrainer(build_tiny_model(), args=args, train_dataset=tiny_dataset)
    with pytest.raises(ValueError, match="Known keys"):
        trainer.model_card_metrics = {"teacher_perplexity": 22.5}
    trainer.model_card_metrics = {"train_steps": 3}
    assert trainer.model_card_metrics == {"train_steps": 3}


# -- Trainer's card kept: the same sections and metadata `Trainer.create_model_card` writes -----------------------


@pytest.fixture
def evaluated_trainer(tmp_path, tiny_dataset):
    teacher = build_tiny_model()
    teacher.config._name_or_path = TEACHER
    student, _ = prune_depth(teacher, remove=[1, 4])
    args = make_args(
        tmp_path, "run", per_device_eval_batch_size=2, learning_rate=1e-3, max_steps=4, logging_steps=2,
        eval_strategy="steps", eval_steps=2, temperature=2.0,
    )  # fmt: skip
    trainer = DistillationTrainer(
        student,
        teacher,
        args,
        train_dataset=tiny_dataset,
        eval_dataset=tiny_dataset.select(range(4)),
        processing_class=build_tiny_tokenizer(),
    )
    trainer.train()
    return trainer


def _table_rows(markdown: str) -> list[list[str]]:
    """The cells of every row of the Markdown tables in `markdown` (the separator lines left out)."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|") and not set(line) <= set("|:- "):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_card_has_trainers_sections_and_hf_recovers(evaluated_trainer):
    from transformers.modelcard import TrainingSummary

    trainer = evaluated_trainer
    trainer.save_model()
    path = Path(trainer.args.output_dir) / "README.md"
    card, meta = path.read_text(encoding="utf-8"), metadata_load(path)

    # Trainer's hyperparameter list, with this run's values
    assert "- learning_rate: 0.001\n" in card
    assert "- train_batch_size: 4\n" in card and "- eval_batch_size: 2\n" in card
    assert "- training_steps: 4\n" in card and "- seed: 0\n" in card
    # the training-results table: one row per evaluation of the log history, with its step and eval_loss
    evaluations = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert [log["step"] for log in evaluations] == [2, 4]
    rows = _table_rows(card.split("### Training results", 1)[1].split("##", 1)[0])
    header, *values = rows
    assert header[:4] == ["Training Loss", "Epoch", "Step", "Validation Loss"]
    assert [row[2] for row in values] == ["2", "4"]
    assert [float(row[3]) for row in values] == pytest.approx([log["eval_loss"] for log in evaluations], abs=1e-4)
    assert "Distillation Loss" in header and "Kd" in header  # the objective and components are columns too
    # the results on the evaluation set: the last evaluation, as Trainer words it
    assert f"- Loss: {evaluations[-1]['eval_loss']:.4f}\n" in card
    # framework versions, as Trainer lists them (and hf_recover's)
    import datasets
    import tokenizers
    import torch
    import transformers

    for name, version in [
        ("Transformers", transformers.__version__),
        ("PyTorch", torch.__version__),
        ("Datasets", datasets.__version__),
        ("Tokenizers", tokenizers.__version__),
    ]:
        assert f"- {name}: {version}\n" in card
    # the metadata: base model = the teacher, Trainer's tag beside ours, the model index
    assert meta["base_model"] == TEACHER
    assert "generated_from_trainer" in meta["tags"] and "depth-pruning" in meta["tags"]
    assert meta["model-index"] == [{"name": "run", "results": []}]
    # and hf_recover's sections
    assert "Removed teacher blocks: [1, 4]" in card and "| distillation (KD) | β = 0.5 |" in card

    # Everything Trainer's own card shows for this run is in ours: each hyperparameter line and table row.
    reference = TrainingSummary.from_trainer(trainer, finetuned_from=TEACHER, license="apache-2.0").to_model_card()
    hyperparameters = reference.split("### Training hyperparameters", 1)[1].split("###", 1)[0]
    for line in hyperparameters.splitlines():
        if line.startswith("- "):
            assert line + "\n" in card
    reference_rows = _table_rows(reference.split("### Training results", 1)[1].split("###", 1)[0])
    assert reference_rows == rows
    reference_meta = ModelCard(reference).data.to_dict()
    assert reference_meta.pop("tags") == ["generated_from_trainer"]
    assert reference_meta == {key: meta[key] for key in reference_meta}


def test_create_model_card_honours_trainers_arguments(evaluated_trainer):
    trainer = evaluated_trainer
    trainer.create_model_card(
        language="en",
        license="mit",
        tags=["my-tag"],
        model_name="my-student",
        finetuned_from="me/pruned-base",
        tasks="text-generation",
        dataset_tags="me/recovery-text",
        dataset="My recovery text",
        dataset_args="default",
    )
    path = Path(trainer.args.output_dir) / "README.md"
    card, meta = path.read_text(encoding="utf-8"), metadata_load(path)
    assert meta["base_model"] == "me/pruned-base"  # finetuned_from wins over the teacher
    assert meta["language"] == ["en"] and meta["license"] == "mit"
    assert meta["tags"][-2:] == ["my-tag", "generated_from_trainer"] and "hf-recover" in meta["tags"]
    assert meta["datasets"] == ["me/recovery-text"]
    (index,) = meta["model-index"]
    assert index["name"] == "my-student"
    assert card.count("\n# my-student\n") == 1
    assert "fine-tuned from [me/pruned-base](https://huggingface.co/me/pruned-base)" in card
    assert "Recovery data: My recovery text" in card
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in card


def test_push_to_hub_passes_trainers_arguments_to_the_card(evaluated_trainer, monkeypatch):
    import hf_recover.publish.hub

    pushed = {}
    monkeypatch.setattr(
        hf_recover.publish.hub, "push_recovered", lambda folder, repo_id, **kw: pushed.update(repo=repo_id)
    )
    evaluated_trainer.model.model_tags = ["model-own-tag"]
    evaluated_trainer.push_to_hub(finetuned_from="me/other-base", language="fr", tags="pushed")
    meta = metadata_load(Path(evaluated_trainer.args.output_dir) / "README.md")
    assert meta["base_model"] == "me/other-base" and meta["language"] == ["fr"]
    assert {"pushed", "model-own-tag", "generated_from_trainer", "hf-recover"} <= set(meta["tags"])
    assert pushed["repo"] == "run"


def test_the_card_shows_every_healing_step_as_the_pruned_config_records_it(tiny_llama):
    """The card's "What was pruned" names each heal: method, spans, skipped runs, calibration tokens and the
    calibration perplexity before and after, all read from the `PrunedConfig` the pruning wrote."""
    rows = [{"input_ids": list(range(3 + i, 19 + i)), "attention_mask": [1] * 16} for i in range(6)]
    student, pruned = prune_depth(tiny_llama, remove=[0, 2, 3], heal="lstsq", data=rows)
    heal = pruned.steps[0]["heal"]
    assert heal["spans"] == [[1, 3]] and heal["skipped"] == [[0, 0]]
    body = generate_model_card(pruned_config=pruned).text
    (line,) = [line for line in body.splitlines() if line.startswith("- Healing of the depth cut")]
    assert "`lstsq`: a least-squares linear map" in line
    assert "spans healed: teacher blocks 2–3 after block 1" in line
    assert "left as cut (nothing before them): blocks 0–0" in line
    assert f"fitted on {heal['calibration_tokens']:,} calibration tokens (the student's activations)" in line
    before, after = heal["calibration_perplexity"]["before"], heal["calibration_perplexity"]["after"]
    assert f"perplexity on the calibration tokens {before:g} → {after:g}" in line
    assert before > 0 and after > 0
    unhealed = generate_model_card(pruned_config=prune_depth(tiny_llama, remove=[2, 3])[1]).text
    assert "Healing" not in unhealed


def test_the_card_says_where_a_width_heal_was_measured(tiny_llama):
    """A width heal before a hidden-size cut is measured there, and the card says so."""
    from hf_recover.prune import prune_width

    rows = [{"input_ids": list(range(3 + i, 19 + i)), "attention_mask": [1] * 16} for i in range(6)]
    _, pruned = prune_width(tiny_llama, pruning_ratio=0.5, hidden_size=28, heal="lstsq", data=rows)
    (line,) = [line for line in generate_model_card(pruned_config=pruned).text.splitlines() if "Healing" in line]
    assert line.startswith("- Healing of the width cut") and "(before the hidden-size cut)" in line
    _, pruned = prune_width(tiny_llama, pruning_ratio=0.5, heal="lstsq", data=rows)
    assert "hidden-size cut" not in generate_model_card(pruned_config=pruned).text


def test_the_model_index_carries_what_the_assistant_writes(tmp_path):
    from huggingface_hub import metadata_load

    metrics = {
        "assistant": {
            "teacher": {"perplexity": 1.8, "top1_agreement": 1.0, "finish_rate": 0.5, "repeated_ngram_rate": 0.1},
            "recovered": {
                "perplexity": 3.1, "top1_agreement": 0.7, "finish_rate": 0.4, "refusal_rate": 0.05,
                "repeated_ngram_rate": 0.2, "instruction_prompt_accuracy": 0.15, "instruction_accuracy": 0.3,
            },
        }
    }  # fmt: skip
    generate_model_card(metrics=metrics).save(tmp_path / "README.md")
    results = metadata_load(tmp_path / "README.md")["model-index"][0]["results"]
    values = {m["type"]: m["value"] for r in results for m in r["metrics"]}
    assert values == {
        "perplexity": 3.1, "top1_agreement": 0.7, "finish_rate": 0.4, "refusal_rate": 0.05,
        "instruction_prompt_accuracy": 0.15, "instruction_accuracy": 0.3,
    }  # fmt: skip
