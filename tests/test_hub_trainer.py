"""The trainer's save hooks and `push_to_hub`: card, pruned config and tokenizer next to every save; one push.

A tiny DistillationTrainer run on CPU; the Hub is intercepted at `HfApi`'s methods (see `test_hub.FakeHub`).
"""

from __future__ import annotations

import json

import pytest
from conftest import TINY_TEXTS, build_tiny_model, build_tiny_tokenizer
from datasets import Dataset
from huggingface_hub import ModelCard, metadata_load
from test_hub import PUSHED, TOKEN, FakeHub, _no_network, snapshot  # noqa: F401 - _no_network is autouse

from hf_recover import DistillationConfig, DistillationTrainer, prepare_recovery_dataset, prune_depth
from hf_recover.hub import BEGIN_MARKER

METRICS = {"perplexity": {"validation": {"teacher": 22.5, "pruned": 46.5, "recovered": 25.6}}, "train_steps": 2}


@pytest.fixture(scope="module")
def data():
    return prepare_recovery_dataset(
        Dataset.from_dict({"text": TINY_TEXTS * 2}), build_tiny_tokenizer(), max_length=24, packing=False
    )


@pytest.fixture
def trainer(tmp_path, data):
    teacher = build_tiny_model()
    teacher.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # as the embedded teacher names itself
    student, _ = prune_depth(teacher, remove=[1, 4])
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        disable_tqdm=True,
        alpha=0.5,
        beta=0.5,
        temperature=2.0,
        hub_model_id="me/tiny-recovered",
        seed=0,
    )
    return DistillationTrainer(student, teacher, args, train_dataset=data, processing_class=build_tiny_tokenizer())


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


def test_push_to_hub_sends_the_saved_model_in_one_commit(trainer, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    trainer.train()
    trainer.model_card_metrics = METRICS
    result = trainer.push_to_hub(token=TOKEN)
    out = tmp_path / "out"
    assert (out / "checkpoint-2").is_dir() and (out / "training_args.bin").is_file()  # junk that must stay local

    assert result == "commit-info"
    assert hub.names() == ["create_repo", "create_commit"]
    (commit,) = hub.commits()
    assert commit["repo_id"] == "me/tiny-recovered" and commit["commit_message"] == "End of training"
    assert sorted(commit["files"]) == PUSHED
    card = ModelCard(commit["files"]["README.md"].decode("utf-8"))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "87.1%" in card.text
    assert json.loads(commit["files"]["pruned_config.json"])["removed_layer_indices"] == [1, 4]
    for path in out.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path

    # a failed push leaves the output folder as it was, and the retry goes through
    before = snapshot(out)
    hub.fail_with.append(ConnectionError("network down"))
    from hf_recover.hub import HubPushError

    with pytest.raises(HubPushError, match="me/tiny-recovered"):
        push_again_without_saving(trainer, token=TOKEN)
    assert snapshot(out) == before
    push_again_without_saving(trainer, token=TOKEN)
    assert len(hub.commits()) == 3 and sorted(hub.commits()[-1]["files"]) == PUSHED


def push_again_without_saving(trainer, **kwargs):
    """push_recovered on the trainer's output folder, as `push_to_hub` does after its save."""
    from hf_recover import push_recovered

    return push_recovered(trainer.args.output_dir, trainer.args.hub_model_id, **kwargs)
