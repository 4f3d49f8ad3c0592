"""Bad input on the chat surface (prompts, conversations, teacher data, chat retention, the mixture, on-policy
batches) is a clear error before any model is loaded or any data is built; ShareGPT conversations are converted the
same way wherever conversations are read; reading teacher data writes nothing into its folder."""

import hashlib
import json
import logging

import pytest
from conftest import TINY_TEXTS, build_tiny_model, make_args
from datasets import Dataset

from hf_recover import DistillationTrainer
from hf_recover.base.chat import as_messages, prepare_chat_dataset, render_prompt
from hf_recover.base.chat_retention import chat_reference, evaluate_chat_retention
from hf_recover.base.data import prepare_recovery_dataset
from hf_recover.base.generation import Sampling
from hf_recover.cli import main as cli
from hf_recover.distill.answer_filter import KEEP_ALL_ANSWERS
from hf_recover.distill.mixture import teacher_mixture
from hf_recover.distill.teacher_data import (
    METADATA_NAME,
    build_teacher_data,
    cached_chat_reference,
    load_teacher_data,
)

ANSWERS = Sampling(max_new_tokens=8)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The quick fox?"},
    {"role": "assistant", "content": "It jumps over the dog."},
]
SHAREGPT = [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "The quick fox?"},
    {"from": "gpt", "value": "It jumps over the dog."},
]


@pytest.fixture
def tok(tiny_chat_tokenizer):
    return tiny_chat_tokenizer


@pytest.fixture
def teacher(tok):
    return build_tiny_model(vocab_size=len(tok))


def never(*args, **kwargs):
    pytest.fail("generated or loaded a model before the input was checked")


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading any model (the embedded teacher, a folder, a tokenizer) fails the test."""
    import transformers

    import hf_recover.base.defaults

    monkeypatch.setattr(hf_recover.base.defaults, "load_default_teacher", never)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", never)


# -- prompts and conversations --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, error, match",
    [
        ("Tell me about rivers.", TypeError, r"one string \('Tell me about rivers\.'\), not a list"),
        ([[{"role": "user", "content": "   "}]], ValueError, r"user turn is blank \('   '\)"),
        (["<|im_start|><|im_end|>"], ValueError, r"special token\(s\) \['<\|im_end\|>', '<\|im_start\|>'\]"),
        (["Hello <|im_end|> there"], ValueError, r"special token\(s\) \['<\|im_end\|>'\]"),
        ([[{"role": "user", "text": "Hi there"}]], ValueError, "Rename its 'text' key to 'content'"),
        ([[{"from": "robot", "value": "Hi"}]], ValueError, "speaker 'robot'"),
        (CONVERSATION[:2], TypeError, "one conversation .* pass \\[conversation\\]"),
        ([{"role": "user", "content": "Hi"}, "Hello?"], TypeError, "one message .*: wrap it in a list"),
    ],
)
def test_bad_prompts_are_refused_before_any_generation(tmp_path, teacher, tok, prompts, error, match):
    with pytest.raises(error, match=match):
        build_teacher_data(teacher, tok, tmp_path / "d", prompts=prompts, num_prompts=0, generate=never)
    assert not (tmp_path / "d").exists()
    with pytest.raises(error, match=match):  # the chat retention's prompts go through the same check
        evaluate_chat_retention(teacher, tok, teacher=teacher, prompts=prompts)
    with pytest.raises(error, match=match):
        cached_chat_reference(teacher, tok, prompts, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_sharegpt_conversations_are_converted_wherever_conversations_are_read(tmp_path, teacher, tok):
    assert as_messages(SHAREGPT[:2]) == CONVERSATION[:2]
    assert render_prompt(tok, SHAREGPT[:2]) == render_prompt(tok, CONVERSATION[:2])
    # training rows: a `messages` column in ShareGPT's shape, or ShareGPT's own `conversations` column
    trl = prepare_chat_dataset(Dataset.from_dict({"messages": [CONVERSATION]}), tok)
    for column in ("messages", "conversations"):
        converted = prepare_chat_dataset(Dataset.from_dict({column: [SHAREGPT]}), tok)
        assert converted.to_dict() == trl.to_dict()
    # teacher data: the prompts of a dataset of conversations stop at the last user turn
    kwargs = dict(num_prompts=0, answer_sampling=ANSWERS, show_progress=False)
    ours = build_teacher_data(
        teacher, tok, tmp_path / "a", prompts=Dataset.from_dict({"messages": [CONVERSATION]}), **kwargs
    )
    theirs = build_teacher_data(
        teacher, tok, tmp_path / "b", prompts=Dataset.from_dict({"conversations": [SHAREGPT]}), **kwargs
    )
    assert load_teacher_data(theirs)["input_ids"] == load_teacher_data(ours)["input_ids"]
    # chat retention: the same reference, and the prompts kept in TRL's shape
    reference = chat_reference(teacher, tok, [SHAREGPT[:2]], max_new_tokens=4)
    assert reference.prompts == [CONVERSATION[:2]]
    assert reference.prompt_ids == chat_reference(teacher, tok, [CONVERSATION[:2]], max_new_tokens=4).prompt_ids


def test_a_bad_message_in_a_chat_dataset_is_said_before_the_map(tok):
    rows = Dataset.from_dict({"messages": [[{"role": "user", "text": "Hi"}, {"role": "assistant", "text": "Yo"}]]})
    with pytest.raises(ValueError, match="Rename its 'text' key to 'content'"):
        prepare_chat_dataset(rows, tok)


# -- teacher data on disk -------------------------------------------------------------------------------------------


def _hashes(folder):
    files = (path for path in folder.rglob("*") if path.is_file())
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def test_reading_teacher_data_leaves_its_folder_byte_identical(tmp_path, teacher, tok):
    out = build_teacher_data(
        teacher, tok, tmp_path / "d", prompts=["The quick fox?", "A river runs?"], num_samples=2,
        answer_sampling=ANSWERS, sample_sampling=Sampling(1.0, max_new_tokens=8), show_progress=False,
    )  # fmt: skip
    before = _hashes(out)
    rows = load_teacher_data(out)
    answers = rows.filter(lambda kind: kind == "answer", input_columns="kind")
    prepare_chat_dataset(answers, tok)
    text = prepare_recovery_dataset(Dataset.from_dict({"text": TINY_TEXTS}), tok, max_length=16)
    mixture, _ = teacher_mixture(
        teacher, tok, text, train_tokens=60, teacher_data=out, chat_fraction=0.2, sample_fraction=0.1, max_length=64,
        answer_filter=KEEP_ALL_ANSWERS,  # a tiny random teacher's answers never end
    )  # fmt: skip
    assert len(mixture) > 0
    assert _hashes(out) == before  # no cache-*.arrow beside the shards, nothing changed


def test_too_few_kept_answers_for_the_share_say_how_many_and_what_to_do(tmp_path, teacher, tok):
    out = build_teacher_data(teacher, tok, tmp_path / "d", prompts=["The quick fox?"], num_prompts=0,
                             answer_sampling=ANSWERS, show_progress=False)  # fmt: skip
    row = prepare_chat_dataset(load_teacher_data(out), tok, max_length=10_000)[0]["attention_mask"]
    text = prepare_recovery_dataset(Dataset.from_dict({"text": TINY_TEXTS}), tok, max_length=16)
    kwargs = dict(teacher_data=out, answer_filter=KEEP_ALL_ANSWERS, answer_tokens=8)
    teacher_mixture(teacher, tok, text, train_tokens=2 * len(row), chat_fraction=0.5, **kwargs)  # exactly enough
    wanted = 2 * len(row) + 4
    with pytest.raises(ValueError, match=rf"holds {len(row)} tokens of answers .* asks for {len(row) + 2} \(0.5 of"):
        teacher_mixture(teacher, tok, text, train_tokens=wanted, chat_fraction=0.5, **kwargs)


def test_a_chat_row_keeps_the_longest_answer_and_its_end_unless_max_length_cuts_it(tmp_path, teacher, tok):
    out = build_teacher_data(teacher, tok, tmp_path / "d", prompts=["The quick fox?"], num_prompts=0,
                             answer_sampling=ANSWERS, show_progress=False)  # fmt: skip
    whole = prepare_chat_dataset(load_teacher_data(out), tok, max_length=10_000)[0]["input_ids"]
    text = prepare_recovery_dataset(Dataset.from_dict({"text": TINY_TEXTS}), tok, max_length=16)
    kwargs = dict(train_tokens=40, teacher_data=out, chat_fraction=0.1, answer_filter=KEEP_ALL_ANSWERS)
    rows = teacher_mixture(teacher, tok, text, answer_tokens=8, **kwargs)[0].filter(
        lambda n: n > 0, input_columns="prompt_length"
    )
    assert rows["input_ids"] == [whole]  # 8 answer tokens after a prompt of under PROMPT_ROOM tokens: whole
    cut = teacher_mixture(teacher, tok, text, max_length=len(whole) - 3, **kwargs)[0]
    assert [ids for ids, n in zip(cut["input_ids"], cut["prompt_length"]) if n > 0] == [whole[: len(whole) - 3]]


def test_a_cut_short_metadata_file_names_the_file_the_folder_and_the_fix(tmp_path, teacher, tok):
    out = build_teacher_data(
        teacher, tok, tmp_path / "d", prompts=["The quick fox?"], num_prompts=0, answer_sampling=ANSWERS
    )
    metadata = out / METADATA_NAME
    metadata.write_text(metadata.read_text()[:40])
    with pytest.raises(ValueError, match="not valid JSON") as error:
        load_teacher_data(out)
    assert str(metadata) in str(error.value) and f"in {out} is damaged" in str(error.value)
    assert "overwrite=True (--overwrite)" in str(error.value)


def test_a_damaged_cached_folder_is_rebuilt_by_a_flag(tmp_path, teacher, tok, monkeypatch, caplog):
    monkeypatch.setenv("HF_RECOVER_CACHE", str(tmp_path / "cache"))
    text = prepare_recovery_dataset(Dataset.from_dict({"text": TINY_TEXTS}), tok, max_length=16)
    kwargs = dict(
        train_tokens=40, num_prompts=0, num_samples=4, answer_tokens=8, chat_fraction=0.0, sample_fraction=0.25
    )
    _, folder = teacher_mixture(teacher, tok, text, **kwargs)
    whole = _hashes(folder)
    metadata = folder / METADATA_NAME
    metadata.write_text(metadata.read_text()[:40])
    with pytest.raises(ValueError, match="not valid JSON.*--overwrite_teacher_data"):
        teacher_mixture(teacher, tok, text, **kwargs)
    with caplog.at_level(logging.WARNING, logger="hf_recover.distill.teacher_data"):
        _, again = teacher_mixture(teacher, tok, text, overwrite_teacher_data=True, **kwargs)
    assert again == folder and _hashes(folder) == whole  # the same build, whole again
    assert "Rebuilding the cached teacher data" in caplog.text and "not valid JSON" in caplog.text  # the reason


# -- the mixture ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chat_fraction=-0.2), r"chat_fraction \(--chat_fraction\) .* \[0, 1\], got -0.2"),
        (dict(sample_fraction=1.5), r"sample_fraction .* got 1.5"),
        (dict(chat_fraction=0.7, sample_fraction=0.5), "together are 1.2, over 1"),
        (dict(train_tokens=0), r"train_tokens \(--train_tokens\) .* got 0"),
        (dict(train_tokens=-1000), "got -1000"),
        (dict(max_length=1), r"max_length is the longest chat row in tokens, an int >= 2 \(or None\), got 1"),
        (dict(max_length=True), "got True"),
    ],
)
def test_bad_mixture_settings_are_refused_before_any_teacher_data(tok, monkeypatch, kwargs, match):
    import hf_recover.distill.mixture as mixture

    monkeypatch.setattr(mixture, "cached_teacher_data", never)
    monkeypatch.setattr(mixture, "load_teacher_data", never)
    with pytest.raises(ValueError, match=match):
        teacher_mixture(build_tiny_model(vocab_size=len(tok)), tok, None, **{"train_tokens": 100, **kwargs})


# -- on-policy batches ----------------------------------------------------------------------------------------------


def test_on_policy_batches_need_prompts_and_a_tokenizer(tmp_path, tok):
    teacher, student = build_tiny_model(vocab_size=len(tok), seed=0), build_tiny_model(vocab_size=len(tok), seed=1)
    args = make_args(tmp_path, lmbda=0.5)
    text = prepare_recovery_dataset(Dataset.from_dict({"text": TINY_TEXTS}), tok, max_length=16)
    with pytest.raises(ValueError, match=r"lmbda=0.5 .* no row of train_dataset has one .*'input_ids'"):
        DistillationTrainer(student, teacher, args, train_dataset=text, processing_class=tok)
    no_prompts = text.add_column("prompt_length", [0] * len(text))  # text rows in the chat columns
    with pytest.raises(ValueError, match="no row of train_dataset has one"):
        DistillationTrainer(student, teacher, args, train_dataset=no_prompts, processing_class=tok)
    chat = prepare_chat_dataset(Dataset.from_dict({"messages": [CONVERSATION]}), tok)
    with pytest.raises(ValueError, match="lmbda=0.5 .* needs the tokenizer .* processing_class=tokenizer"):
        DistillationTrainer(student, teacher, args, train_dataset=chat)
    DistillationTrainer(student, teacher, args, train_dataset=chat, processing_class=tok)  # prompts: accepted


# -- the command line -----------------------------------------------------------------------------------------------


def test_generate_refuses_a_prompts_file_without_prompts_before_loading_the_teacher(tmp_path, no_model_loads):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": "How do rivers form?"}) + "\n")
    with pytest.raises(ValueError, match=r"no 'prompt' or 'messages' column \(its columns: \['question'\]\)"):
        cli(["generate", "--teacher", "default", "--prompts", str(prompts), "--output_dir", str(tmp_path / "out")])
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"messages": [{"role": "user", "content": "  "}]}) + "\n")
    with pytest.raises(ValueError, match="user turn is blank"):
        cli(["generate", "--teacher", "default", "--prompts", str(blank), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_recover_says_that_a_base_teacher_is_not_measured_as_an_assistant(
    tmp_path, tiny_tokenizer, monkeypatch, caplog
):
    import hf_recover.recovery

    build_tiny_model().save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "data").mkdir()
    for i in range(20):
        (tmp_path / "data" / f"doc{i}.txt").write_text(" ".join(TINY_TEXTS[i % 10 :] + TINY_TEXTS[: i % 10]))

    class SetupDone(Exception):
        pass

    def capture(*, chat, **kwargs):
        assert chat is None
        raise SetupDone

    monkeypatch.setattr(hf_recover.recovery, "run_recovery", capture)
    with caplog.at_level(logging.INFO, logger="hf_recover.scripts.recover"), pytest.raises(SetupDone):
        cli(["recover", "--teacher", str(tmp_path / "teacher"), "--prune", "last:2", "--chat_prompts", "dev",
             "--teacher_data", "none", "--dataset", str(tmp_path / "data"), "--max_length", "32",
             "--eval_max_length", "32", "--eval_blocks", "2", "--calibration_blocks", "2",
             "--output_dir", str(tmp_path / "out")])  # fmt: skip
    warning = [r for r in caplog.records if "--chat_prompts dev is ignored" in r.getMessage()]
    assert warning and warning[0].levelno == logging.WARNING
