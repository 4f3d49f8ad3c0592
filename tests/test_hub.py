"""`push_recovered` and the trainer's `push_to_hub`, offline.

Every push is intercepted at huggingface_hub's API boundary (`HfApi.create_repo`, `create_branch`,
`create_commit`); sockets are closed for the whole module, so nothing can reach the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import httpx2
import pytest
import requests
import test_card
from conftest import build_tiny_model, build_tiny_tokenizer
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

from hf_recover import HubPushError, push_recovered, save_model_card

TOKEN = "hf_SeCrEtT0kenThatMustNeverBeWritten42"
TEACHER, FULL_METRICS, METRICS = test_card.TEACHER, test_card.FULL_METRICS, test_card.METRICS
depth_pruned_config = test_card.depth_pruned_config
# fixtures shared with the card's tests (`_no_network` is autouse)
_no_network, tiny_dataset, trainer = test_card._no_network, test_card.tiny_dataset, test_card.trainer
depth_then_width_model = test_card.depth_then_width_model


# -- push_recovered ----------------------------------------------------------------------------------------


class FakeHub:
    """Stands in for the Hub at `HfApi`'s methods; records every call."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, dict]] = []
        self.fail_with: list[BaseException] = []  # raised by the next create_commit calls, in order
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, "token": api.token, **kwargs}))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(api, repo_id, **kwargs):
            hub.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def create_commit(api, repo_id, operations, **kwargs):
            operations = list(operations)
            files = {}
            for op in operations:
                source = op.path_or_fileobj
                files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
            hub.calls.append(("create_commit", {"repo_id": repo_id, "files": files, "token": api.token, **kwargs}))
            if hub.fail_with:
                raise hub.fail_with.pop(0)
            return "commit-info"

        def refuse(*args, **kwargs):
            raise AssertionError("only create_repo/create_branch/create_commit may be used")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        for name in ("upload_folder", "upload_file", "upload_large_folder", "preupload_lfs_files"):
            if hasattr(HfApi, name):
                monkeypatch.setattr(HfApi, name, refuse)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def commits(self) -> list[dict]:
        return [kwargs for name, kwargs in self.calls if name == "create_commit"]


@pytest.fixture
def hub(monkeypatch):
    return FakeHub(monkeypatch)


@pytest.fixture(scope="module")
def _saved_model(tmp_path_factory):
    """A recovered model as the trainer leaves it: weights, tokenizer, pruned config, card, and training junk."""
    folder = tmp_path_factory.mktemp("saved") / "recovered"
    build_tiny_model().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    depth_pruned_config().save_pretrained(folder)
    save_model_card(folder, metrics=FULL_METRICS, hub_model_id="me/recovered")
    checkpoint = folder / "checkpoint-2"
    checkpoint.mkdir()
    for name in ("model.safetensors", "config.json", "README.md"):
        shutil.copy(folder / name, checkpoint / name)
    (checkpoint / "optimizer.pt").write_bytes(b"junk")
    for name in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        (folder / name).write_bytes(b"junk " + name.encode())
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out.tfevents").write_bytes(b"junk")
    return folder


@pytest.fixture
def saved_model(_saved_model, tmp_path):
    folder = tmp_path / "recovered"
    shutil.copytree(_saved_model, folder)
    return folder


PUSHED = [
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "pruned_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_push_sends_the_model_in_one_commit(saved_model, hub):
    before = snapshot(saved_model)
    result = push_recovered(saved_model, "me/recovered", private=True, token=TOKEN, commit_message="Recovered!")
    assert result == "commit-info"
    assert hub.names() == ["create_repo", "create_commit"]
    repo_call = hub.calls[0][1]
    assert repo_call["repo_id"] == "me/recovered" and repo_call["exist_ok"] is True and repo_call["private"] is True
    (commit,) = hub.commits()
    assert commit["repo_id"] == "me/recovered"
    assert commit["commit_message"] == "Recovered!"
    assert commit["token"] == TOKEN  # the token reaches the API client, and only it
    assert sorted(commit["files"]) == PUSHED  # no checkpoint-*/, optimizer, training_args.bin, runs/
    for name, data in commit["files"].items():
        assert data == (saved_model / name).read_bytes()
    assert snapshot(saved_model) == before


def test_push_default_message_and_revision(saved_model, hub):
    push_recovered(saved_model, "me/recovered", revision="v2")
    assert hub.names() == ["create_repo", "create_branch", "create_commit"]
    assert hub.calls[1][1]["branch"] == "v2" and hub.calls[1][1]["exist_ok"] is True
    (commit,) = hub.commits()
    assert commit["revision"] == "v2"
    assert commit["commit_message"] == "Upload model recovered with hf_recover"


def test_push_without_a_card_sends_one_rendered_in_memory(saved_model, hub):
    (saved_model / "README.md").unlink()
    before = snapshot(saved_model)
    push_recovered(saved_model, "me/recovered")
    (commit,) = hub.commits()
    assert sorted(commit["files"]) == PUSHED
    card = ModelCard(commit["files"]["README.md"].decode("utf-8"))
    assert card.data.base_model == TEACHER and 'model_id = "me/recovered"' in card.text
    assert snapshot(saved_model) == before  # rendered, not written


def test_push_sharded_weights(tmp_path, hub):
    folder = tmp_path / "sharded"
    build_tiny_model().save_pretrained(folder, max_shard_size="20KB")
    depth_pruned_config().save_pretrained(folder)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    push_recovered(folder, "me/sharded")
    (commit,) = hub.commits()
    assert sorted(commit["files"]) == sorted(
        ["README.md", "config.json", "generation_config.json", "model.safetensors.index.json", PRUNED, *shards]
    )


PRUNED = "pruned_config.json"


def test_push_a_lora_adapter(tmp_path, hub):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    push_recovered(tmp_path / "adapter", "me/adapter")
    (commit,) = hub.commits()
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(commit["files"])


def http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/me/recovered/commit/main")
    return HfHubHTTPError(f"{status} Client Error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (httpx2.ConnectError("connection refused"), "could not be reached"),
        (requests.ConnectionError("DNS failure"), "could not be reached"),
        (TimeoutError("timed out"), "could not be reached"),
        (http_error(401), "rejected the token"),
        (http_error(403), "may not write to me/recovered"),
        (http_error(503), "HTTP 503"),
    ],
    ids=["httpx", "requests", "timeout", "401", "403", "503"],
)
def test_failed_push_is_clear_leaves_the_folder_intact_and_can_be_retried(saved_model, hub, error, expected):
    before = snapshot(saved_model)
    hub.fail_with.append(error)
    with pytest.raises(HubPushError) as info:
        push_recovered(saved_model, "me/recovered", token=TOKEN)
    message = str(info.value)
    assert "'me/recovered'" in message and expected in message
    assert "local folder was not changed" in message and "retry" in message
    assert isinstance(info.value, RuntimeError) and info.value.__cause__ is error
    assert snapshot(saved_model) == before

    assert push_recovered(saved_model, "me/recovered", token=TOKEN) == "commit-info"
    assert len(hub.commits()) == 2 and sorted(hub.commits()[1]["files"]) == PUSHED
    assert snapshot(saved_model) == before


def test_no_token_in_files_or_logs(saved_model, hub, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    # an error whose text carries the token must not carry it into our message
    hub.fail_with.append(OSError(f"proxy refused Authorization: Bearer {TOKEN}"))
    with pytest.raises(HubPushError) as info:
        push_recovered(saved_model, "me/recovered", token=TOKEN)
    assert TOKEN not in str(info.value) and "***" in str(info.value)
    push_recovered(saved_model, "me/recovered", token=TOKEN)
    logging.getLogger("hf_recover.publish.hub").error("failure: %s", info.value)  # as a caller would log it
    save_model_card(saved_model, metrics=FULL_METRICS, hub_model_id="me/recovered")

    assert "Pushing 7 files" in caplog.text  # logging was captured
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err
    for path in saved_model.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for commit in hub.commits():
        assert all(TOKEN.encode() not in data for data in commit["files"].values())


# -- bad input: a clear error before anything is sent ------------------------------------------------------


def expect_refused(hub, folder, repo_id, error, match):
    before = snapshot(folder) if folder.is_dir() else None
    with pytest.raises(error, match=match):
        push_recovered(folder, repo_id, token=TOKEN)
    assert hub.calls == []
    if before is not None:
        assert snapshot(folder) == before


def test_push_refuses_a_folder_without_weights(saved_model, hub):
    (saved_model / "model.safetensors").rename(saved_model / "pytorch_model.bin")
    expect_refused(hub, saved_model, "me/recovered", FileNotFoundError, r"no safetensors weights.*pytorch_model\.bin")


def test_push_refuses_a_missing_folder(tmp_path, hub):
    expect_refused(hub, tmp_path / "nope", "me/recovered", FileNotFoundError, "is not a folder")


def test_push_refuses_weights_without_config(saved_model, hub):
    (saved_model / "config.json").unlink()
    expect_refused(hub, saved_model, "me/recovered", FileNotFoundError, "no config.json")


def test_push_refuses_an_index_with_missing_shards(tmp_path, hub):
    folder = tmp_path / "sharded"
    build_tiny_model().save_pretrained(folder, max_shard_size="20KB")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    expect_refused(hub, folder, "me/sharded", FileNotFoundError, "lists weight shards that are not in the folder")


@pytest.mark.parametrize("repo_id", ["not a repo", "me/too/deep", "me/bad--name", "me/.hidden", "", "me/x.git"])
def test_push_refuses_an_invalid_repo_id(saved_model, hub, repo_id):
    expect_refused(hub, saved_model, repo_id, ValueError, "Invalid Hub repo id")


def test_push_refuses_a_pruned_config_with_another_block_count(saved_model, hub):
    depth_pruned_config(kept_layer_indices=[0, 1, 2, 4, 6], student_intermediate_sizes=[64] * 5).save_pretrained(
        saved_model
    )
    expect_refused(
        hub,
        saved_model,
        "me/recovered",
        ValueError,
        r"describes 5 blocks.*num_hidden_layers=6.*weights hold 6 transformer blocks",
    )


def test_push_refuses_weights_with_another_block_count(saved_model, hub):
    # config.json edited to agree with pruned_config.json, but the weights still hold 6 blocks
    depth_pruned_config(kept_layer_indices=[0, 1, 2, 4, 6], student_intermediate_sizes=[64] * 5).save_pretrained(
        saved_model
    )
    config = json.loads((saved_model / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (saved_model / "config.json").write_text(json.dumps(config))
    expect_refused(hub, saved_model, "me/recovered", ValueError, r"the weights hold 6 transformer blocks")


def test_push_refuses_a_pruned_config_with_other_mlp_sizes(saved_model, hub):
    depth_pruned_config(student_intermediate_sizes=[64, 64, 32, 64, 64, 64]).save_pretrained(saved_model)
    expect_refused(hub, saved_model, "me/recovered", ValueError, r"the weights have MLP sizes \[(64, ){5}64\]")


def test_push_refuses_an_unreadable_pruned_config(saved_model, hub):
    (saved_model / PRUNED).write_text(json.dumps({"teacher_num_layers": 6, "not_a_field": 1}))
    expect_refused(hub, saved_model, "me/recovered", ValueError, "is not a valid pruned config")


def test_push_checks_per_block_mlp_sizes_of_a_width_pruned_model(tmp_path, hub, depth_then_width_model):
    model, pruned = depth_then_width_model
    folder = tmp_path / "pruned"
    model.save_pretrained(folder)
    pruned.save_pretrained(folder)
    save_model_card(folder)
    push_recovered(folder, "me/pruned")
    assert sorted(hub.commits()[0]["files"]) == sorted(
        ["README.md", "config.json", "generation_config.json", "model.safetensors", PRUNED]
    )

    # a pruned_config.json from another width pruning: same block count, other MLP sizes
    hub.calls.clear()
    data = json.loads((folder / PRUNED).read_text())
    data["student_intermediate_sizes"] = [64, 48, 64, 48]
    (folder / PRUNED).write_text(json.dumps(data))
    expect_refused(
        hub,
        folder,
        "me/pruned",
        ValueError,
        r"hf_recover_intermediate_sizes \[48, 64, 48, 64\].*the weights have MLP sizes \[48, 64, 48, 64\]",
    )


# -- the trainer's push_to_hub ----------------------------------------------------------------------------


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
    with pytest.raises(HubPushError, match="me/tiny-recovered"):
        push_again_without_saving(trainer, token=TOKEN)
    assert snapshot(out) == before
    push_again_without_saving(trainer, token=TOKEN)
    assert len(hub.commits()) == 3 and sorted(hub.commits()[-1]["files"]) == PUSHED


def push_again_without_saving(trainer, **kwargs):
    """push_recovered on the trainer's output folder, as `push_to_hub` does after its save."""
    from hf_recover import push_recovered

    return push_recovered(trainer.args.output_dir, trainer.args.hub_model_id, **kwargs)
