"""Chat data and chat retention: assistant-only labels, batched generation against a token-by-token reference, the
repeated n-gram rate and the retention figures against hand computations."""

import json
import math

import pytest
import torch
from conftest import build_tiny_model
from datasets import Dataset

from hf_recover.base.chat import (
    chat_example,
    end_of_turn_ids,
    prepare_chat_dataset,
    render_prompt,
    repeated_ngram_rate,
)
from hf_recover.base.chat_retention import (
    chat_reference,
    chat_retention_table,
    evaluate_chat_retention,
    load_chat_prompts,
    log_perplexity_recovery,
)
from hf_recover.base.constants import IGNORE_INDEX
from hf_recover.base.generation import Sampling, generate_completions

CONVERSATION = [
    {"role": "user", "content": "The quick fox?"},
    {"role": "assistant", "content": "It jumps over the dog."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "It sleeps in the sun."},
]


def test_only_the_assistants_turns_are_trained_on(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    example = chat_example(tok, CONVERSATION)
    ids, labels = example["input_ids"], example["labels"]
    assert ids == tok.apply_chat_template(CONVERSATION, return_dict=False)
    kept = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in kept)
    # by hand: the assistant's words and the end-of-turn token of each assistant turn, nothing else
    trained_text = tok.decode([ids[i] for i in kept])
    assert trained_text == "It jumps over the dog.<|im_end|>It sleeps in the sun.<|im_end|>"
    first_turn = len(tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, return_dict=False))
    assert kept[0] == first_turn  # the assistant header and everything before it are masked


def test_a_chat_example_needs_an_assistant_turn(tiny_chat_tokenizer):
    with pytest.raises(ValueError, match="at least one assistant turn"):
        chat_example(tiny_chat_tokenizer, CONVERSATION[:1])


def test_chat_data_needs_a_chat_template(tiny_tokenizer):
    with pytest.raises(ValueError, match="needs a chat template"):
        prepare_chat_dataset(Dataset.from_dict({"messages": [CONVERSATION]}), tiny_tokenizer)


def test_prepared_rows_keep_prompt_length_and_cut_at_max_length(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    data = Dataset.from_dict({"messages": [CONVERSATION, CONVERSATION[:2]]})
    rows = prepare_chat_dataset(data, tok, max_length=512)
    full = chat_example(tok, CONVERSATION)
    assert rows[0]["input_ids"] == full["input_ids"] and rows[0]["labels"] == full["labels"]
    assert rows[0]["attention_mask"] == [1] * len(full["input_ids"])
    assert rows[0]["prompt_length"] == next(i for i, x in enumerate(full["labels"]) if x != IGNORE_INDEX)
    short = prepare_chat_dataset(data, tok, max_length=rows[0]["prompt_length"] + 3)
    assert [len(r) for r in short["input_ids"]] == [rows[0]["prompt_length"] + 3] * 2
    with pytest.raises(ValueError, match="No conversation has an assistant token"):
        prepare_chat_dataset(data, tok, max_length=rows[0]["prompt_length"])


def test_repeated_ngram_rate_by_hand():
    assert repeated_ngram_rate([[1, 2, 3, 4, 5]]) == 0.0
    # 1 2 3 4 1 2 3 4: five 4-grams, (1 2 3 4) once more -> 1 repeated of 5
    assert repeated_ngram_rate([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 / 5)
    # a loop: 7 7 7 7 7 7 -> three 4-grams, two repeat the first
    assert repeated_ngram_rate([[7] * 6, [1, 2]]) == pytest.approx(2 / 3)
    assert repeated_ngram_rate([[1, 2], []]) == 0.0


def _greedy_by_hand(model, prompt, stop_ids, max_new_tokens):
    """One token at a time, the whole sequence re-run each step: no cache, no batch, no padding."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax())
            tokens.append(token)
            if token in stop_ids:
                break
    return tokens[len(prompt) :]


def test_batched_greedy_generation_equals_token_by_token(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    model = build_tiny_model(vocab_size=len(tok))
    prompts = [render_prompt(tok, p) for p in ("The quick fox?", "A river runs?", "Perplexity is the exponential?")]
    stop = end_of_turn_ids(model, tok)
    assert tok.eos_token_id in stop
    got = generate_completions(
        model, prompts, stop_ids=stop, pad_id=tok.pad_token_id, sampling=Sampling(max_new_tokens=9), batch_size=2
    )
    for prompt, completion in zip(prompts, got):
        assert completion == _greedy_by_hand(model, prompt, stop, 9)


def test_sampled_generation_is_reproducible_and_stops_at_the_end_of_turn(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    model = build_tiny_model(vocab_size=len(tok))
    prompts = [render_prompt(tok, "The quick fox?")] * 4
    sampling = Sampling(temperature=1.0, max_new_tokens=12)
    kwargs = dict(stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, sampling=sampling)
    first = generate_completions(model, prompts, seed=3, **kwargs)
    assert generate_completions(model, prompts, seed=3, **kwargs) == first
    assert len({tuple(c) for c in first}) > 1  # sampled, not four copies
    for completion in first:
        assert tok.eos_token_id not in completion[:-1]  # cut right after the first end of turn
        assert len(completion) <= 12


def test_chat_retention_equals_a_hand_computation(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    teacher = build_tiny_model(vocab_size=len(tok), seed=0)
    student = build_tiny_model(vocab_size=len(tok), seed=1)
    prompts = ["The quick fox?", "A river runs?"]
    reference = chat_reference(teacher, tok, prompts, max_new_tokens=6)
    for prompt, prompt_ids, answer in zip(prompts, reference.prompt_ids, reference.answer_ids):
        assert prompt_ids == render_prompt(tok, prompt)
        assert answer == _greedy_by_hand(teacher, prompt_ids, [tok.eos_token_id], 6)
    score = evaluate_chat_retention(student, tokenizer=tok, reference=reference)

    nll = agree = count = 0
    with torch.no_grad():
        for prompt_ids, answer in zip(reference.prompt_ids, reference.answer_ids):
            logits = student(input_ids=torch.tensor([prompt_ids + answer])).logits[0].float()
            for k, token in enumerate(answer):
                row = logits[len(prompt_ids) + k - 1]  # the position that predicts answer token k
                nll -= torch.log_softmax(row, -1)[token].item()
                agree += int(row.argmax()) == token
                count += 1
    assert score.tokens == count
    assert score.nll == pytest.approx(nll / count, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert score.top1_agreement == pytest.approx(agree / count)
    own = [_greedy_by_hand(student, p, [tok.eos_token_id], 6) for p in reference.prompt_ids]
    assert score.answers == own
    assert score.repeated_ngram_rate == pytest.approx(repeated_ngram_rate(own))

    import hf_recover

    public = hf_recover.evaluate_chat_retention(
        student, tok, teacher=teacher, prompts=prompts, max_new_tokens=6, answer=False
    )
    assert public.nll == pytest.approx(nll / count, rel=1e-5)  # the public form builds the same reference itself
    with pytest.warns(FutureWarning, match="former order"):  # (model, teacher, prompts, tokenizer) still works
        former = hf_recover.evaluate_chat_retention(student, teacher, prompts, tok, max_new_tokens=6, answer=False)
    assert former.nll == public.nll
    with pytest.warns(FutureWarning, match="former order"):
        former = hf_recover.evaluate_chat_retention(
            student, teacher, prompts, tokenizer=tok, max_new_tokens=6, answer=False
        )
    assert former.nll == public.nll
    with pytest.warns(FutureWarning, match="former order"):  # a teacher of None, given positionally, as before
        former = hf_recover.evaluate_chat_retention(student, None, None, tok, reference=reference, answer=False)
    assert former.nll == pytest.approx(nll / count, rel=1e-5)
    with pytest.raises(TypeError, match="positionally"):
        hf_recover.evaluate_chat_retention(student, tok, prompts)
    with pytest.raises(TypeError, match="twice"):
        hf_recover.evaluate_chat_retention(student, teacher, prompts, tok, tokenizer=tok)

    itself = evaluate_chat_retention(teacher, tokenizer=tok, reference=reference, answer=False)
    assert itself.top1_agreement == 1.0  # greedy answers are the teacher's own argmax
    assert itself.answers == [] and itself.repeated_ngram_rate is None


def test_the_reference_carries_the_teachers_own_figures_and_is_cached(tiny_chat_tokenizer, tmp_path, monkeypatch):
    import hf_recover.distill.teacher_data as teacher_data
    from hf_recover.base.chat_retention import evaluate_assistant

    tok = tiny_chat_tokenizer
    teacher = build_tiny_model(vocab_size=len(tok), seed=0)
    prompts = ["The quick fox?", "A river runs?", "Why?"]
    reference = teacher_data.cached_chat_reference(teacher, tok, prompts, max_new_tokens=6, cache_dir=tmp_path)
    itself = evaluate_chat_retention(teacher, tokenizer=tok, reference=reference)
    assert reference.teacher.top1_agreement == 1.0 and reference.teacher.repetition_ratio in (None, 1.0)
    assert reference.teacher.nll == pytest.approx(itself.nll) and itself.answers == reference.answer_ids
    # read back, not generated again: the very same answers and figures
    monkeypatch.setattr(teacher_data, "chat_reference", lambda *a, **k: pytest.fail("generated again"))
    again = teacher_data.cached_chat_reference(teacher, tok, prompts, max_new_tokens=6, cache_dir=tmp_path)
    assert again.answer_ids == reference.answer_ids and again.prompt_ids == reference.prompt_ids
    assert again.teacher.to_dict() == reference.teacher.to_dict()
    for changed in ({"max_new_tokens": 5}, {"prompts": prompts[:2]}):  # another key: computed, not read
        with pytest.raises(pytest.fail.Exception, match="generated again"):
            kwargs = {"prompts": prompts, "max_new_tokens": 6, **changed}
            teacher_data.cached_chat_reference(teacher, tok, cache_dir=tmp_path, **kwargs)
    # the teacher's figures come with the reference; the others answer as asked
    student = build_tiny_model(vocab_size=len(tok), seed=1)
    scores = evaluate_assistant({"teacher": teacher, "pruned": student}, reference, tok, answer=1)
    assert scores["teacher"] is reference.teacher
    assert len(scores["pruned"].answers) == 1 and scores["pruned"].repeated_ngram_rate is None
    assert evaluate_assistant({"pruned": student}, reference, tok)["pruned"].repeated_ngram_rate is not None


def test_log_perplexity_recovery_and_the_table(tiny_chat_tokenizer):
    from hf_recover.base.chat_retention import ChatRetention

    def score(nll):
        return ChatRetention(math.exp(nll), nll, 0.5, 0.1, 1.0, 10)

    teacher, pruned, recovered = score(0.5), score(2.0), score(1.0)
    assert log_perplexity_recovery(teacher, pruned, recovered) == pytest.approx(1.0 / 1.5)
    table = chat_retention_table({"teacher": teacher, "pruned": pruned, "recovered": recovered})
    assert table["recovered"]["log_perplexity_recovery"] == pytest.approx(2 / 3)
    assert "log_perplexity_recovery" not in table["teacher"]


def test_the_evaluation_prompts_are_two_disjoint_hand_written_sets():
    dev, test = load_chat_prompts("dev"), load_chat_prompts("test")
    assert len(dev) >= 32 and len(test) >= 48
    assert not set(dev) & set(test)
    with pytest.raises(ValueError, match="split must be one of"):
        load_chat_prompts("train")


def test_loop_stop_ends_only_rows_stuck_in_a_loop():
    from hf_recover.base.generation import LoopStop

    stop = LoopStop(prompt_width=3, stop_ids=[0], window=16, max_rate=0.5)
    prompt = [7, 8, 9]
    loop = [1, 2, 3, 4] * 5  # 20 new tokens: 13 4-grams in the last 16, 9 of them repeats (69%)
    varied = list(range(10, 30))  # no 4-gram repeats
    ended = [0] + [1, 2, 3, 4] * 4 + [0, 0, 0]  # ended its turn first: padding after it is not a loop
    ids = torch.tensor([prompt + loop, prompt + varied, prompt + ended[:20]])
    assert stop(ids[:, :15]).tolist() == [False, False, False]  # fewer new tokens than the window: no verdict
    assert stop(ids).tolist() == [True, False, False]
    assert stop.stopped_at.tolist() == [20, -1, -1]


def test_generation_cuts_a_loop_short_and_leaves_other_completions_whole(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    model = build_tiny_model(vocab_size=len(tok), seed=3)
    prompts = [render_prompt(tok, p) for p in ("The quick fox?", "A river runs?", "Tell me a rhyme.")]
    kwargs = dict(stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, sampling=Sampling(max_new_tokens=160))
    whole = generate_completions(model, prompts, **kwargs)
    cut = generate_completions(model, prompts, stop_loops=True, **kwargs)
    for full, short in zip(whole, cut):
        assert full[: len(short)] == short  # greedy: the same tokens up to the cut
        if len(short) < len(full):  # cut: the last 64 tokens repeat most of their 4-grams, no stop token
            assert tok.eos_token_id not in short and repeated_ngram_rate([short[-64:]]) > 0.5
    assert any(len(s) < len(f) for s, f in zip(cut, whole)), "a random tiny model loops greedily"
    # padded with the end-of-turn token itself (SmolLM2's pad is its eos): a cut loop still reads as unfinished
    eos_padded = generate_completions(model, prompts, stop_loops=True, **{**kwargs, "pad_id": tok.eos_token_id})
    assert eos_padded == cut


def test_a_damaged_cached_reference_is_answered_again(tiny_chat_tokenizer, tmp_path):
    import hf_recover.distill.teacher_data as teacher_data

    tok = tiny_chat_tokenizer
    teacher = build_tiny_model(vocab_size=len(tok), seed=0)
    first = teacher_data.cached_chat_reference(teacher, tok, ["The quick fox?"], max_new_tokens=4, cache_dir=tmp_path)
    (entry,) = (tmp_path / "chat-reference").glob("*.json")
    entry.write_text(entry.read_text()[:30])
    again = teacher_data.cached_chat_reference(teacher, tok, ["The quick fox?"], max_new_tokens=4, cache_dir=tmp_path)
    assert again.answer_ids == first.answer_ids
    assert json.loads(entry.read_text())["answer_ids"] == first.answer_ids  # replaced whole
