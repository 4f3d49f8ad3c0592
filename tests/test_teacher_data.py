"""Teacher data: prompts the teacher writes (Magpie) filtered as documented, its answers with exact tokens and masks,
unconditional samples, resuming, fingerprints, and the bad inputs refused before any generation."""

import shutil

import pytest
import torch
from conftest import build_tiny_model
from datasets import Dataset

from hf_recover.base.chat import chat_example, render_prompt
from hf_recover.base.constants import IGNORE_INDEX
from hf_recover.base.generation import Sampling, generate_completions
from hf_recover.distill.teacher_data import (
    METADATA_NAME,
    PromptFilter,
    build_teacher_data,
    load_teacher_data,
    read_teacher_data_metadata,
)

ANSWERS = Sampling(max_new_tokens=8)


@pytest.fixture
def tok(tiny_chat_tokenizer):
    return tiny_chat_tokenizer


@pytest.fixture
def teacher(tok):
    return build_tiny_model(vocab_size=len(tok))


class ScriptedPrompts:
    """A generator whose Magpie candidates are scripted (a tiny random model writes no sensible prompt) and whose
    answers are the model's real greedy completions."""

    def __init__(self, tok, candidates):
        self.tok, self.candidates, self.calls = tok, list(candidates), []

    def __call__(self, model, prompt_ids, sampling, seed):
        self.calls.append((len(prompt_ids), sampling, seed))
        if sampling.temperature > 0:  # the Magpie round: scripted user turns
            texts = [self.candidates.pop(0) if self.candidates else "" for _ in prompt_ids]
            return [
                self.tok(t, add_special_tokens=False)["input_ids"] + ([self.tok.eos_token_id] if t else [])
                for t in texts
            ]
        return generate_completions(model, prompt_ids, stop_ids=[self.tok.eos_token_id], pad_id=0, sampling=sampling)


def test_given_prompts_get_the_teachers_greedy_answers_with_exact_tokens(tmp_path, teacher, tok):
    prompts = ["The quick fox?", [{"role": "user", "content": "A river runs?"}]]
    out = build_teacher_data(teacher, tok, tmp_path / "d", prompts=prompts, num_prompts=0, answer_sampling=ANSWERS)
    data = load_teacher_data(out, teacher=teacher, tokenizer=tok)
    assert len(data) == 2 and set(data["kind"]) == {"answer"} and set(data["prompt_source"]) == {"dataset"}
    for prompt, row in zip(prompts, data):
        prompt_ids = render_prompt(tok, prompt)
        completion = generate_completions(
            teacher, [prompt_ids], stop_ids=[tok.eos_token_id], pad_id=0, sampling=ANSWERS
        )[0]
        assert row["input_ids"] == prompt_ids + completion
        assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion
        assert row["prompt_length"] == len(prompt_ids)
        assert row["finished"] == (completion[-1] == tok.eos_token_id)
        assert row["messages"][-1] == {
            "role": "assistant",
            "content": tok.decode(completion, skip_special_tokens=True).strip(),
        }


def test_magpie_prompts_are_filtered_and_deduplicated(tmp_path, teacher, tok):
    candidates = [
        "How do rivers form?",  # kept
        "how  do rivers FORM?",  # a duplicate once normalised
        "Hi",  # too short for min_tokens
        "Tell me about the lazy dog and the fox and the sun and the book",  # too long for max_tokens=20
        "What is <|im_start|> doing here?",  # a template token inside
        "Why is the sun warm?",  # kept
    ]
    scripted = ScriptedPrompts(tok, candidates)
    out = build_teacher_data(
        teacher, tok, tmp_path / "d", num_prompts=3, shard_size=3, answer_sampling=ANSWERS,
        prompt_filter=PromptFilter(min_tokens=4, max_tokens=20), generate=scripted,
    )  # fmt: skip
    data = load_teacher_data(out)
    assert [row[0]["content"] for row in data["messages"]] == ["How do rivers form?", "Why is the sun warm?"]
    pre_query = scripted.calls[0]
    assert pre_query[0] == 3 and pre_query[1].temperature == 1.0  # 3 candidates a round, sampled
    for row in data:  # every prompt was asked through the chat template, default system prompt included
        assert row["input_ids"][: row["prompt_length"]] == render_prompt(tok, row["messages"][0]["content"])
        assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nYou are a tiny helpful assistant.")


def test_a_candidate_cut_at_the_length_limit_is_not_a_prompt(tmp_path, teacher, tok):
    def unfinished(model, prompt_ids, sampling, seed):
        if sampling.temperature > 0:
            return [tok("How do rivers form", add_special_tokens=False)["input_ids"]] * len(prompt_ids)  # no eos
        pytest.fail("answered a prompt that never ended")

    out = build_teacher_data(teacher, tok, tmp_path / "d", num_prompts=2, generate=unfinished)
    with pytest.raises(ValueError, match="holds no row"):
        load_teacher_data(out)


def test_unconditional_samples_start_from_the_beginning_of_text(tmp_path, teacher, tok):
    sampling = Sampling(temperature=1.0, max_new_tokens=7)
    out = build_teacher_data(
        teacher, tok, tmp_path / "d", num_prompts=0, num_samples=3, sample_sampling=sampling, seed=5
    )
    data = load_teacher_data(out)
    assert set(data["kind"]) == {"sample"} and len(data) == 3
    for row in data:
        assert row["input_ids"][0] == tok.bos_token_id and row["labels"][0] == IGNORE_INDEX
        assert row["labels"][1:] == row["input_ids"][1:] and 2 <= len(row["input_ids"]) <= 8
    again = build_teacher_data(
        teacher, tok, tmp_path / "e", num_prompts=0, num_samples=3, sample_sampling=sampling, seed=5
    )
    assert load_teacher_data(again)["input_ids"] == data["input_ids"]  # seeded


def test_an_interrupted_build_resumes_to_the_same_data(tmp_path, teacher, tok):
    prompts = ["The quick fox?", "A river runs?", "The kernel schedules?", "She sells shells?"]
    kwargs = dict(prompts=prompts, num_prompts=0, shard_size=1, answer_sampling=ANSWERS)
    whole = load_teacher_data(build_teacher_data(teacher, tok, tmp_path / "whole", **kwargs))

    calls = []

    def crash_on_third(model, prompt_ids, sampling, seed):
        calls.append(seed)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return generate_completions(model, prompt_ids, stop_ids=[tok.eos_token_id], pad_id=0, sampling=sampling)

    with pytest.raises(KeyboardInterrupt):
        build_teacher_data(teacher, tok, tmp_path / "cut", generate=crash_on_third, **kwargs)
    with pytest.raises(FileNotFoundError, match="interrupted"):
        load_teacher_data(tmp_path / "cut")
    calls.clear()
    resumed = build_teacher_data(teacher, tok, tmp_path / "cut", generate=crash_on_third, **kwargs)
    assert len(calls) == 2  # only the two shards that were missing
    assert load_teacher_data(resumed)["input_ids"] == whole["input_ids"]


def test_data_of_another_teacher_or_tokenizer_is_refused(tmp_path, teacher, tok, tiny_tokenizer):
    out = build_teacher_data(
        teacher, tok, tmp_path / "d", prompts=["The quick fox?"], num_prompts=0, answer_sampling=ANSWERS
    )
    with pytest.raises(ValueError, match="other teacher weights"):
        load_teacher_data(out, teacher=build_tiny_model(vocab_size=len(tok), seed=7))
    with pytest.raises(ValueError, match="another tokenizer"):
        load_teacher_data(out, tokenizer=tiny_tokenizer)
    assert read_teacher_data_metadata(out)["answer_sampling"]["max_new_tokens"] == 8


def test_a_damaged_build_is_refused(tmp_path, teacher, tok):
    out = build_teacher_data(
        teacher,
        tok,
        tmp_path / "d",
        prompts=["The quick fox?", "A river?"],
        num_prompts=0,
        shard_size=1,
        answer_sampling=ANSWERS,
    )
    arrow = sorted((out / "shards" / "shard-00001").glob("*.arrow"))[0]
    arrow.write_bytes(arrow.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_teacher_data(out)
    shutil.rmtree(out / "shards" / "shard-00001")
    with pytest.raises(FileNotFoundError, match="shard-00001"):
        load_teacher_data(out)
    (out / METADATA_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="No teacher data"):
        load_teacher_data(out)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompts=["", "  "]), ValueError, "no usable text"),
        (dict(prompts=Dataset.from_dict({"question": ["a?"]})), ValueError, "no 'prompt' or 'messages' column"),
        (dict(prompts=[[{"role": "assistant", "content": "hi"}]]), ValueError, "last message must be the user's"),
        (dict(num_prompts=0), ValueError, "Nothing to generate"),
        (dict(num_prompts=-1), ValueError, "num_prompts must be an int >= 0"),
        (dict(shard_size=0), ValueError, "shard_size must be an int >= 1"),
    ],
)
def test_bad_inputs_are_refused_before_any_generation(tmp_path, teacher, tok, kwargs, error, match):
    def never(*args):
        pytest.fail("generated")

    with pytest.raises(error, match=match):
        build_teacher_data(teacher, tok, tmp_path / "d", generate=never, **kwargs)
    assert not (tmp_path / "d").exists()


def test_answers_need_a_chat_template(tmp_path, tiny_tokenizer):
    teacher = build_tiny_model()
    with pytest.raises(ValueError, match="needs a chat template"):
        build_teacher_data(teacher, tiny_tokenizer, tmp_path / "d", num_prompts=4)
    out = build_teacher_data(
        teacher,
        tiny_tokenizer,
        tmp_path / "d",
        num_prompts=0,
        num_samples=2,
        sample_sampling=Sampling(1.0, max_new_tokens=4),
    )
    assert set(load_teacher_data(out)["kind"]) == {"sample"}  # a base model: samples only


def test_messages_datasets_and_teacher_data_give_the_same_training_rows(tmp_path, teacher, tok):
    from hf_recover.base.chat import prepare_chat_dataset

    out = build_teacher_data(
        teacher, tok, tmp_path / "d", prompts=["The quick fox?"], num_prompts=0, answer_sampling=ANSWERS
    )
    data = load_teacher_data(out)
    exact = prepare_chat_dataset(data, tok)[0]
    assert exact["input_ids"] == data[0]["input_ids"] and exact["labels"] == data[0]["labels"]
    if data[0]["finished"]:  # a finished answer re-tokenises to the same tokens through the template
        example = chat_example(tok, data[0]["messages"])
        assert [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX] == [
            t for t in exact["labels"] if t != IGNORE_INDEX
        ]


def test_the_prompts_of_a_messages_dataset_stop_at_the_last_user_turn(tmp_path, teacher, tok):
    conversation = [
        {"role": "user", "content": "The quick fox?"},
        {"role": "assistant", "content": "It jumps."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "It sleeps."},
    ]
    out = build_teacher_data(
        teacher,
        tok,
        tmp_path / "d",
        prompts=Dataset.from_dict({"messages": [conversation]}),
        num_prompts=0,
        answer_sampling=ANSWERS,
    )
    row = load_teacher_data(out)[0]
    assert row["messages"][:3] == conversation[:3] and row["messages"][3]["role"] == "assistant"
    assert row["input_ids"][: row["prompt_length"]] == render_prompt(tok, conversation[:3])
    assert torch.tensor(row["labels"][: row["prompt_length"]]).eq(IGNORE_INDEX).all()


def test_several_answers_per_prompt_are_kept_with_their_figures_and_filtered_on_reading(tmp_path, teacher, tok):
    from hf_recover.base.chat import repeated_ngram_rate
    from hf_recover.distill.answer_filter import GOOD_ANSWERS, AnswerFilter

    loop = "the dog and the cat " * 6
    scripted = {  # (prompt, candidate) -> answer text, and whether it ends its turn
        "How do rivers form?": [("Rain runs downhill into them.", True), ("Rain runs downhill and", False)],
        "Can you send my email?": [("I'm sorry, but I cannot send emails.", True), (loop, True)],
        "Why is the sun warm?": [("It burns hydrogen.", True), ("Fusion heats it.", True)],
    }
    prompts = list(scripted)

    def generate(model, prompt_ids, sampling, seed):
        assert sampling.temperature > 0  # several answers to a prompt are sampled
        rendered = {tuple(render_prompt(tok, p)): p for p in prompts}
        seen: dict[str, int] = {}
        out = []
        for ids in prompt_ids:
            prompt = rendered[tuple(ids)]
            text, ends = scripted[prompt][seen.setdefault(prompt, 0)]
            seen[prompt] += 1
            out.append(tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if ends else []))
        return out

    sampled = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=64)
    out = build_teacher_data(
        teacher, tok, tmp_path / "d", prompts=prompts, num_prompts=0, answers_per_prompt=2, answer_sampling=sampled,
        generate=generate,
    )  # fmt: skip
    every = load_teacher_data(out)  # by default every answer, with its figures
    assert len(every) == 6 and every["candidate"] == [0, 1] * 3
    assert every["finished"] == [True, False, True, True, True, True]
    assert every["refusal"] == [False, False, True, False, False, False]
    loop_ids = tok(loop, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert every[3]["repeated_ngram_rate"] == pytest.approx(repeated_ngram_rate([loop_ids]), rel=1e-6)
    assert every[3]["repeated_ngram_rate"] > GOOD_ANSWERS.max_repeated_ngram_rate > every[0]["repeated_ngram_rate"]

    good = load_teacher_data(out, answer_filter=GOOD_ANSWERS)  # finished, no refusal, no loop
    assert [m[-1]["content"] for m in good["messages"]] == [
        "Rain runs downhill into them.", "It burns hydrogen.", "Fusion heats it."
    ]  # fmt: skip
    first = load_teacher_data(out, answer_filter=AnswerFilter(max_answers_per_prompt=1))
    assert [m[-1]["content"] for m in first["messages"]] == ["Rain runs downhill into them.", "It burns hydrogen."]
    unfiltered = AnswerFilter(finished_only=False, drop_refusals=False, max_repeated_ngram_rate=None)
    assert len(load_teacher_data(out, answer_filter=unfiltered)) == 6
    # the length cap counts the answer's tokens with its end-of-turn, by hand: at that count an answer stays
    lengths = {m[-1]["content"]: len(tok(m[-1]["content"], add_special_tokens=False)["input_ids"]) + 1 for m in
               good["messages"]}  # fmt: skip
    shortest = min(lengths.values())
    assert len(set(lengths.values())) > 1  # the cap below tells the answers apart
    capped = load_teacher_data(out, answer_filter=AnswerFilter(max_answer_tokens=shortest))
    assert [m[-1]["content"] for m in capped["messages"]] == [a for a, n in lengths.items() if n == shortest]
    assert max(capped["answer_tokens"]) == shortest

    report = read_teacher_data_metadata(out)["answers"]  # what the card reports, by hand
    assert (report["answers"], report["prompts"]) == (6, 3)
    assert report["finished"] == pytest.approx(5 / 6) and report["refusals"] == pytest.approx(1 / 6)
    assert report["repetitive"] == pytest.approx(1 / 6)
    assert (report["kept_answers"], report["kept_prompts"]) == (3, 2)
    card = " ".join((out / "README.md").read_text().split())
    assert "83.3% end" in card and "16.7% refuse" in card and "keeps 3 answers to 2 prompts" in card
    assert "(`GOOD_ANSWERS`: finished, no refusal, no loop, at most 256 tokens)" in card  # the default, in words


def test_several_greedy_answers_per_prompt_and_bad_filters_are_refused(tmp_path, teacher, tok):
    from hf_recover.distill.answer_filter import AnswerFilter

    with pytest.raises(ValueError, match="answers_per_prompt=3 with greedy answers"):
        build_teacher_data(
            teacher, tok, tmp_path / "d", prompts=["Hi there you"], num_prompts=0, answers_per_prompt=3,
            generate=lambda *a: pytest.fail("generated"),
        )  # fmt: skip
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="answers_per_prompt must be an int >= 1"):
        build_teacher_data(teacher, tok, tmp_path / "d", prompts=["Hi there you"], answers_per_prompt=0)
    with pytest.raises(ValueError, match="max_repeated_ngram_rate is a share"):
        AnswerFilter(max_repeated_ngram_rate=1.5)
    with pytest.raises(ValueError, match="max_answers_per_prompt must be a positive int"):
        AnswerFilter(max_answers_per_prompt=0)
    for bad in (0, -5, True, 2.5):
        with pytest.raises(ValueError, match="max_answer_tokens must be a positive int or None"):
            AnswerFilter(max_answer_tokens=bad)


def test_the_build_reports_its_generation_speed_beside_a_forwards(tmp_path, teacher, tok, caplog, monkeypatch):
    """The build counts the new tokens it generated and logs their rate beside a teacher forward's over the last
    batch's rows; the clock counts exactly the completions' tokens."""
    import logging

    import hf_recover.distill.teacher_data as teacher_data
    from hf_recover.base.generation import GenerationClock, forward_tokens_per_second

    clock = GenerationClock()
    assert clock.timed([[1, 2]], lambda: [[5, 6, 7], []]) == [[5, 6, 7], []]
    assert clock.new_tokens == 3 and clock.seconds > 0 and clock.last == ([[1, 2]], [[5, 6, 7], []])
    assert forward_tokens_per_second(teacher, [[5, 6, 7], [1, 2]], pad_id=0) > 0
    seen = []
    monkeypatch.setattr(
        teacher_data, "forward_tokens_per_second", lambda model, rows, pad: seen.append(rows) or 1234.0
    )
    prompts = ["The quick fox?", "A river runs?"]
    with caplog.at_level(logging.INFO, logger=teacher_data.__name__):
        out = build_teacher_data(teacher, tok, tmp_path / "d", prompts=prompts, num_prompts=0, answer_sampling=ANSWERS)
    data = load_teacher_data(out, teacher=teacher, tokenizer=tok)
    written = sum(len(row["input_ids"]) - row["prompt_length"] for row in data)
    message = next(record.getMessage() for record in caplog.records if "new tokens" in record.getMessage())
    assert message.startswith(f"Teacher data: {written} new tokens in ") and "reads 1234 tokens/s" in message
    assert sorted(seen[0]) == sorted(row["input_ids"] for row in data)  # the forward reads the rows just written


def test_the_data_card_names_what_the_answer_filter_keeps():
    from dataclasses import asdict

    from hf_recover.distill.answer_filter import KEEP_ALL_ANSWERS, AnswerFilter
    from hf_recover.distill.teacher_data_card import _kept_are

    capped = AnswerFilter(max_answer_tokens=256, max_answers_per_prompt=1)
    assert _kept_are(asdict(capped)) == "finished, no refusal, no loop, at most 256 tokens, at most 1 per prompt"
    assert _kept_are(asdict(KEEP_ALL_ANSWERS)) == "every answer"
    earlier = {key: value for key, value in asdict(AnswerFilter()).items() if key != "max_answer_tokens"}
    assert "max_answer_tokens" in asdict(AnswerFilter())
    assert _kept_are(earlier) == "finished, no refusal, no loop"  # a card written before the length cap
