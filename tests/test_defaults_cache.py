"""The embedded defaults' cache is checked on load: a truncated, rewritten or missing file is rebuilt, an
untouched one is not hashed again. Offline, on tiny fake caches (nothing is downloaded)."""

import hashlib
import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from hf_recover.base.defaults import assets, corpus, teacher

FILES = {"weights.bin": b"w" * 5000, "sub/config.json": b'{"a": 1}', "notes.txt": b"hello"}


class FakeBuild:
    """Builds a small folder the way the real builders do (staging folder, record, rename) and counts calls."""

    def __init__(self, files=FILES):
        self.files, self.calls = files, 0

    def __call__(self, folder):
        self.calls += 1
        staging = folder.with_name(folder.name + ".partial")
        for name, content in self.files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(content)
        assets.write_record(staging, {"origin": "test"})
        staging.rename(folder)


def later(path, seconds=5):
    """Give `path` a modification time `seconds` after its current one, as a real later rewrite or copy would
    (set explicitly so that the test does not depend on the file system's clock granularity)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


@pytest.fixture
def built(tmp_path):
    build = FakeBuild()
    folder = assets.ensure_built(tmp_path / "thing", build, what="test thing")
    return folder, build


def test_the_record_holds_each_file_size_and_sha256(built):
    folder, build = built
    record = json.loads((folder / assets.RECORD_NAME).read_text())
    assert record["origin"] == "test" and set(record["files"]) == set(FILES)
    for name, content in FILES.items():
        assert record["files"][name]["size"] == len(content)
        assert record["files"][name]["sha256"] == hashlib.sha256(content).hexdigest()
    assets.ensure_built(folder, build, what="test thing")
    assert build.calls == 1  # intact: not rebuilt


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda f: f.joinpath("weights.bin").write_bytes(b"w" * 4000), "weights.bin has 4,000 bytes, 5,000 were"),
        (lambda f: f.joinpath("sub/config.json").unlink(), "sub/config.json is missing"),
        (lambda f: (f.joinpath("notes.txt").write_bytes(b"HELLO"), later(f / "notes.txt")), "notes.txt was changed"),
        (lambda f: f.joinpath(assets.RECORD_NAME).write_text("{trunc"), "hf_recover_source.json is unreadable"),
    ],
    ids=["truncated", "missing", "wrong-hash", "corrupt-record"],
)
def test_a_damaged_cache_is_rebuilt_and_the_warning_says_why(built, caplog, damage, problem):
    folder, build = built
    damage(folder)
    assert assets.find_damage(folder) and problem in "; ".join(assets.find_damage(folder))
    with caplog.at_level(logging.WARNING, logger="hf_recover.base.defaults.assets"):
        assets.ensure_built(folder, build, what="test thing")
    assert build.calls == 2
    assert problem in caplog.text and str(folder) in caplog.text
    assert assets.find_damage(folder) == []
    assert {n: (folder / n).read_bytes() for n in FILES} == FILES


def test_an_untouched_file_is_not_hashed_again(built, monkeypatch):
    folder, build = built
    monkeypatch.setattr(assets, "sha256_of", lambda path: pytest.fail(f"hashed {path} although it is untouched"))
    assert assets.find_damage(folder) == []


def test_a_copied_intact_file_is_hashed_once_then_trusted(built, monkeypatch):
    folder, build = built
    later(folder / "weights.bin")  # e.g. `cp -r` without -p: same bytes, new time
    hashed = []
    real = assets.sha256_of
    monkeypatch.setattr(assets, "sha256_of", lambda path: hashed.append(path.name) or real(path))
    assert assets.find_damage(folder) == []
    assert hashed == ["weights.bin"]
    assert assets.find_damage(folder) == [] and hashed == ["weights.bin"]  # the new time was recorded
    assert build.calls == 1


def test_a_failed_rebuild_leaves_no_damaged_folder_behind(built):
    folder, _ = built
    (folder / "weights.bin").write_bytes(b"")

    def offline(target):
        raise RuntimeError("Could not download the thing")

    with pytest.raises(RuntimeError, match="Could not download"):
        assets.ensure_built(folder, offline, what="test thing")
    assert not folder.exists()  # the next call builds from scratch instead of loading a damaged file


def _legacy_folder(tmp_path, truncate: bool):
    """A cache written by an hf_recover without records: a source file without a file list."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    save_file({"w": torch.arange(100, dtype=torch.float32)}, folder / "model.safetensors")
    if truncate:
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:-40])
    (folder / assets.RECORD_NAME).write_text(json.dumps({"hub_id": "x"}))
    return folder


def test_an_intact_legacy_cache_is_recorded_not_rebuilt(tmp_path):
    folder = _legacy_folder(tmp_path, truncate=False)
    build = FakeBuild()
    assets.ensure_built(folder, build, what="test thing", legacy_marker=assets.RECORD_NAME)
    assert build.calls == 0
    record = json.loads((folder / assets.RECORD_NAME).read_text())
    assert record["hub_id"] == "x"
    assert record["files"]["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size


def test_a_truncated_legacy_cache_is_rebuilt(tmp_path):
    folder = _legacy_folder(tmp_path, truncate=True)
    build = FakeBuild()
    assets.ensure_built(folder, build, what="test thing", legacy_marker=assets.RECORD_NAME)
    assert build.calls == 1 and not (folder / "model.safetensors").exists() and (folder / "weights.bin").is_file()


# -- the teacher and the corpus use it --------------------------------------------------------------------


def test_a_truncated_teacher_cache_is_converted_again(monkeypatch, tmp_path, tiny_llama, tiny_tokenizer, caplog):
    conversions = []

    def fake_convert(folder):  # what _convert_teacher leaves: a saved model, its tokenizer and the record
        conversions.append(folder)
        staging = tmp_path / "staging"
        tiny_llama.save_pretrained(staging)
        tiny_tokenizer.save_pretrained(staging)
        assets.write_record(staging, {"hub_id": teacher.DEFAULT_TEACHER_ID})
        staging.rename(folder)

    monkeypatch.setattr(teacher, "_convert_teacher", fake_convert)
    model, _ = teacher.load_default_teacher(tmp_path / "cache")
    ids = torch.tensor([[3, 5, 8]])
    expected = model(ids).logits
    del model  # its tensors may map the file that is damaged next
    weights = teacher.default_teacher_path(tmp_path / "cache") / "model.safetensors"
    assert len(conversions) == 1
    # A killed copy or a full disk: the file is cut short. Loading it as is fails with
    # `SafetensorError: incomplete metadata`; the check converts the teacher again instead.
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="hf_recover.base.defaults.assets"):
        reloaded, _ = teacher.load_default_teacher(tmp_path / "cache")
    assert len(conversions) == 2 and "model.safetensors has" in caplog.text
    assert torch.equal(reloaded(ids).logits, expected)


def test_a_damaged_corpus_cache_is_built_again(tmp_path, monkeypatch, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    monkeypatch.setattr(corpus, "default_teacher_path", lambda cache_dir=None: tmp_path / "tokenizer")
    fetched = []

    def fake_fetch(source, workdir):
        fetched.append(source.name)
        return [{"id": f"{source.name}/{i}", "text": f"{source.name} text {i}."} for i in range(20)], "1.0"

    monkeypatch.setattr(corpus, "_fetch", fake_fetch)
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    first = list(corpus.load_default_corpus(tmp_path / "cache")["train"]["text"])  # read now: damaged below
    builds = len(fetched)
    folder = tmp_path / "cache" / "corpora" / f"default-{corpus.CORPUS_VERSION}"
    record = json.loads((folder / assets.RECORD_NAME).read_text())
    assert "train/data-00000-of-00001.arrow" in record["files"] and "README.md" in record["files"]
    corpus.load_default_corpus(tmp_path / "cache")
    assert len(fetched) == builds  # intact: loaded, not built again
    arrow = folder / "train" / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[:100])
    again = corpus.load_default_corpus(tmp_path / "cache")
    assert len(fetched) == 2 * builds
    assert list(again["train"]["text"]) == first
