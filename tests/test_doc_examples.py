"""Every Python example of the README and of docs/*.md runs, on tiny models.

Each ```python block is executed; the blocks of one file run in order in one namespace, so a page may build on its
earlier blocks. The embedded teacher and corpus are swapped for tiny ones: a random Llama of SmolLM2-135M-Instruct's
shape at toy scale (30 blocks, 9 query heads in 3 key/value groups, so that `n=6`, `heads=6` or
`hidden_size=0.75` mean what they mean on the real teacher) with the tests' tiny chat tokenizer, and a corpus of
`TINY_TEXTS`. The real loaders (a 135M model from a cache) are never called.

The examples are written for the real teacher; `SUBSTITUTIONS` shrinks their sequence lengths, step counts and
generation lengths for the test, and every entry must still apply somewhere. A block that cannot run here (it needs
the Hub or a GPU) is marked in the Markdown by a `<!-- not-run: reason -->` comment on the line before its fence;
such blocks are reported as skipped, and there may be at most `MAX_NOT_RUN` of them. Bash blocks are not run.
"""

from __future__ import annotations

import copy
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_TEXTS, build_tiny_chat_tokenizer, build_tiny_model

import hf_recover
import hf_recover.base.defaults as defaults

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->$")
MAX_NOT_RUN = 3

SUBSTITUTIONS = (
    # (pattern, replacement): sizes for the real teacher, shrunk for a tiny one whose attention is eager. Chat rows
    # (system prompt, question, answer) are written with max_length=512: the tiny tokenizer needs ~100 tokens there.
    (r"\bmax_length=256\b", "max_length=32"),
    (r"\bmax_length=512\b", "max_length=128"),
    (r"\bmax_steps=\d+", "max_steps=2"),
    (r"\bmax_new_tokens=128\b", "max_new_tokens=8"),
    (r"\bnum_prompts=(256|128)\b", "num_prompts=8"),  # a random tiny teacher ends about half its Magpie prompts
    (r"\banswer_tokens=384\b", "answer_tokens=16"),
    (r"\btrain_tokens=61_440\b", "train_tokens=256"),
)

TEACHER_SHAPE = dict(
    num_hidden_layers=30,
    hidden_size=72,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=192,
    max_position_embeddings=512,
)
"""SmolLM2-135M-Instruct's layout (30 blocks, 9 query heads, 3 KV heads) at an eighth of its hidden size: 72, so that
`heads=6` with `hidden_size=0.75` (54, a multiple of 6) reloads as it does on the real 576."""


@dataclass
class Block:
    document: Path
    line: int
    code: str
    not_run: str | None

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def python_blocks(document: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, with the reason given by a not-run marker on the line before."""
    lines = document.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        if fence.group(2) == "python":
            marker = NOT_RUN.match(lines[i - 1].strip()) if i else None
            code = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(document, i + 1, code, marker.group("reason") if marker else None))
        i = end + 1
    return blocks


def shrunk(code: str) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code)
    return code


ALL_BLOCKS = [block for document in DOCUMENTS for block in python_blocks(document)]
RUN = [block for block in ALL_BLOCKS if block.not_run is None]
NOT_RUN_BLOCKS = [block for block in ALL_BLOCKS if block.not_run is not None]


# -- the tiny defaults -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_chat_tokenizer():
    return build_tiny_chat_tokenizer()


@pytest.fixture
def chat_tokenizer(trained_chat_tokenizer):
    """A copy per page: what one page's examples do to the tokenizer (a pad token, a template) stays there."""
    return copy.deepcopy(trained_chat_tokenizer)


@pytest.fixture(scope="module")
def tiny_corpus():
    from datasets import Dataset, DatasetDict

    def split(name: str, count: int, offset: int) -> Dataset:
        texts = [" ".join(TINY_TEXTS[(offset + i + j) % len(TINY_TEXTS)] for j in range(3)) for i in range(count)]
        ids = [f"{name}/{i}" for i in range(count)]
        return Dataset.from_dict({"text": texts, "source": ["tiny"] * count, "id": ids})

    corpus = DatasetDict(train=split("train", 480, 0), validation=split("validation", 48, 3), ood=split("ood", 48, 7))
    held_out = DatasetDict(git_docs=split("git_docs", 48, 1), jargon=split("jargon", 48, 5))
    return corpus, held_out


@pytest.fixture
def tiny_defaults(monkeypatch, tmp_path, chat_tokenizer, tiny_corpus):
    """The embedded teacher and corpus replaced by tiny ones wherever hf_recover looks them up; the examples run in
    an empty folder (with `examples/` linked in) and hf_recover's cache lives in it."""
    from hf_recover.base.defaults import DEFAULT_TEACHER_ID

    corpus, held_out = tiny_corpus

    def load_default_teacher(cache_dir=None, *, dtype=None):
        model = build_tiny_model("llama", eos_token_id=chat_tokenizer.eos_token_id, **TEACHER_SHAPE)
        model.config._name_or_path = DEFAULT_TEACHER_ID
        return (model.to(dtype) if dtype is not None else model).eval(), chat_tokenizer

    def real_teacher(*args, **kwargs):
        raise AssertionError("a documentation example reached the real embedded teacher")

    for module in (hf_recover, defaults):
        monkeypatch.setattr(module, "load_default_teacher", load_default_teacher)
        monkeypatch.setattr(module, "load_default_corpus", lambda cache_dir=None: corpus)
    monkeypatch.setattr(defaults, "load_held_out_corpus", lambda cache_dir=None: held_out)
    monkeypatch.setattr(defaults, "default_teacher_path", real_teacher)
    monkeypatch.setenv("HF_RECOVER_CACHE", str(tmp_path / "cache"))
    # A random tiny teacher's answers run to the length limit: the answer filter, which keeps finished answers for
    # the real teacher, keeps all of them here, or the examples' mixtures would have no answer to train on.
    from hf_recover.distill.answer_filter import AnswerFilter

    monkeypatch.setattr(AnswerFilter, "keeps", lambda self, row: True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    monkeypatch.chdir(work)


# -- the tests ---------------------------------------------------------------------------------------------------


def test_the_documentation_has_examples_and_few_are_not_run():
    assert len(RUN) >= 20, [block.name for block in RUN]
    assert len(NOT_RUN_BLOCKS) <= MAX_NOT_RUN, [block.name for block in NOT_RUN_BLOCKS]
    readme = [block for block in RUN if block.document.name == "README.md"]
    assert readme, "the README's drop-in example is a runnable Python block"
    for document in DOCUMENTS:
        lines = document.read_text(encoding="utf-8").splitlines()
        # a Python block this parser would not see, or a marker that marks no block, is a mistake in the page
        assert not [n for n, line in enumerate(lines, 1) if re.match(r"^\s+`{3,}python", line)], document
        markers = sum(bool(NOT_RUN.match(line.strip())) for line in lines)
        assert markers == sum(block.document == document for block in NOT_RUN_BLOCKS), document


def test_every_substitution_still_applies():
    """A substitution that matches no example any more is stale: remove it."""
    for pattern, _ in SUBSTITUTIONS:
        assert any(re.search(pattern, block.code) for block in RUN), pattern


def test_the_parser_finds_blocks_and_not_run_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n\n<!-- not-run: needs the Hub -->\n```python\n"
        "push()\n```\n\n````markdown\n```python\nnot a block of this page\n```\n````\n"
    )
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.not_run) for b in blocks] == [(3, "x = 1\n", None), (12, "push()\n", "needs the Hub")]


PAGES = [document for document in DOCUMENTS if any(block.document == document for block in RUN)]


@pytest.mark.parametrize("document", PAGES, ids=[str(d.relative_to(ROOT)) for d in PAGES])
def test_the_examples_of_a_page_run(document, tiny_defaults):
    namespace = {"__name__": "__doc_example__"}
    for block in (block for block in RUN if block.document == document):
        code = "\n" * block.line + shrunk(block.code)  # tracebacks point at the Markdown file's own lines
        try:
            exec(compile(code, str(document), "exec"), namespace)
        except Exception:
            pytest.fail(f"The example at {block.name} raised:\n{traceback.format_exc()}", pytrace=False)


@pytest.mark.parametrize("block", NOT_RUN_BLOCKS, ids=[block.name for block in NOT_RUN_BLOCKS])
def test_a_block_marked_not_run_is_skipped(block):
    compile(block.code, block.name, "exec")  # it is still valid Python
    pytest.skip(f"not run: {block.not_run}")
