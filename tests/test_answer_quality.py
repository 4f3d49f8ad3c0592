"""What a model's own answers look like (finish, refusals, repetition, length), instruction following through IFEval's
verifiers, and the chat-retention figures built on them, against hand computations."""

import pytest
import torch
from conftest import build_tiny_model

from hf_recover.base.answer_quality import answer_quality, is_finished, is_refusal
from hf_recover.base.chat import end_of_turn_ids, render_prompt
from hf_recover.base.chat_retention import chat_reference, chat_retention_table, evaluate_chat_retention
from hf_recover.base.instruction_following import (
    check_instruction_prompts,
    load_instruction_prompts,
    score_instruction_following,
)

REFUSALS = [
    "I'm sorry, but as an AI I can't help with that.",
    "I apologize for the confusion, but I am unable to browse the internet.",
    "As a chatbot designed to assist with programming, I'm unable to assist with programming tasks.",
    "I’m sorry for the misunderstanding, but I don't have the capability to send emails.",
    "Unfortunately, I cannot provide medical advice.",
    "As a large language model, I cannot answer that.",
    "Sorry, but I can't do that.",
    "I cannot answer questions about the future.",
    "I won't write that.",
    "I'm just an AI, so I have no opinions.",
    "I am not allowed to share that.",
]
ANSWERS = [
    "Rivers carry water from the hills to the sea.",
    "I'm sorry to hear that you feel tired. Try to sleep at the same time every night.",
    "Here are three ideas: a salad, a wrap and a soup.",
    "The sorry state of the bridge was fixed in 1990.",
    "def reverse(items):\n    return items[::-1]",
    "I'm sorry for your loss. Here are a few ways to remember her.",
    "ChatGPT works as a language model that predicts the next word.",
    "The game was designed as a text-based adventure in 1977.",
    "Siri acts as a virtual assistant on the phone.",
    "I can't help but admire the view from the bridge.",
    "As an AIrport guide, here are the gates.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_recognised(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", ANSWERS)
def test_answers_are_not_refusals(text):
    assert not is_refusal(text)


def test_a_refusal_is_judged_on_the_answers_opening():
    late = "Rivers carry water to the sea. " * 10 + "I'm sorry, I can't say more."
    assert not is_refusal(late)


def test_answer_quality_by_hand():
    stop = [0, 9]
    completions = [[5, 6, 0], [1, 2, 3, 1, 2, 3, 1, 2], [7, 9], [4]]
    texts = ["A fine answer.", "I'm sorry, but I cannot help with that.", "Yes.", "No"]
    quality = answer_quality(completions, texts, stop)
    assert quality.answers == 4
    assert quality.finish_rate == pytest.approx(2 / 4)  # the first and third end with a stop token
    assert quality.refusal_rate == pytest.approx(1 / 4)
    # 4-grams: none in [5,6,0]; [1,2,3,1,2,3,1,2] has 5, of which (1,2,3,1) repeats? no: (1,2,3,1) (2,3,1,2)
    # (3,1,2,3) (1,2,3,1)* (2,3,1,2)* -> 2 repeated of 5
    assert quality.repeated_ngram_rate == pytest.approx(2 / 5)
    assert quality.mean_length == pytest.approx((3 + 8 + 2 + 1) / 4)
    assert is_finished([3, 0], stop) and not is_finished([], stop) and not is_finished([0, 3], stop)
    with pytest.raises(ValueError, match="one text per completion"):
        answer_quality(completions, texts[:2], stop)
    with pytest.raises(ValueError, match="at least one"):
        answer_quality([], [], stop)


ITEMS = [
    {"key": 1, "prompt": "Name a river. Do not use any commas.", "instruction_id_list": ["punctuation:no_comma"],
     "kwargs": [{}]},
    {"key": 2, "prompt": "Write a title for a poem about rain, wrapped in double angular brackets like <<title>>, "
     "and end your answer with a P.S.",
     "instruction_id_list": ["detectable_format:title", "detectable_content:postscript"],
     "kwargs": [{}, {"postscript_marker": "P.S."}]},
]  # fmt: skip


def test_instruction_following_matches_ifevals_rules_by_hand():
    checked = check_instruction_prompts(ITEMS)
    responses = ["The Nile, of course.", "<<Rain Song>>\nDrops on the roof.\nP.S. Bring an umbrella."]
    # by hand: a comma breaks the first instruction; the second answer has a <<title>> and a P.S.
    score = score_instruction_following(checked, responses)
    assert (score.prompts, score.instructions) == (2, 3)
    assert score.prompt_accuracy == pytest.approx(1 / 2)
    assert score.instruction_accuracy == pytest.approx(2 / 3)
    fixed = score_instruction_following(checked, ["The Nile", "Rain Song\nP.S. Bring an umbrella."])
    assert fixed.prompt_accuracy == pytest.approx(1 / 2)  # no <<title>> now
    assert fixed.instruction_accuracy == pytest.approx(2 / 3)
    # loose also accepts the answer without its first line: a comma there fails strict, not loose
    opened = score_instruction_following(checked[:1], ["Sure, here it is:\nThe Nile"])
    assert (opened.prompt_accuracy, opened.loose_prompt_accuracy) == (0.0, 1.0)
    with pytest.raises(ValueError, match="one per prompt"):
        score_instruction_following(checked, responses[:1])


def test_bad_instruction_prompts_are_refused_before_any_answer():
    with pytest.raises(TypeError, match="list of IFEval items"):
        check_instruction_prompts(ITEMS[0])
    with pytest.raises(ValueError, match="Unknown IFEval instruction 'format:nonsense'"):
        check_instruction_prompts([{**ITEMS[0], "instruction_id_list": ["format:nonsense"]}])
    with pytest.raises(ValueError, match="one kwargs dict per instruction id"):
        check_instruction_prompts([{**ITEMS[1], "kwargs": [{}]}])
    with pytest.raises(ValueError, match="NLTK's data"):
        check_instruction_prompts(
            [{**ITEMS[0], "instruction_id_list": ["length_constraints:number_sentences"], "kwargs": [{}]}]
        )
    with pytest.raises(ValueError, match="lacks \\['kwargs'\\]"):
        check_instruction_prompts([{"prompt": "Hi", "instruction_id_list": ["punctuation:no_comma"]}])


def test_the_shipped_instruction_prompts_are_two_disjoint_valid_sets():
    dev, test = load_instruction_prompts("dev"), load_instruction_prompts("test")
    assert len(dev) >= 40 and len(test) >= 40
    assert not {i["prompt"] for i in dev} & {i["prompt"] for i in test}
    assert not {i["key"] for i in dev} & {i["key"] for i in test}
    assert check_instruction_prompts(dev) and check_instruction_prompts(test)
    with pytest.raises(ValueError, match="split must be one of"):
        load_instruction_prompts("train")


def test_own_answer_figures_of_chat_retention_equal_a_hand_computation(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    teacher = build_tiny_model(vocab_size=len(tok), seed=0)
    student = build_tiny_model(vocab_size=len(tok), seed=1)
    stop = end_of_turn_ids(teacher, tok)
    items = [{"key": 1, "prompt": "Name a river without commas.", "instruction_id_list": ["punctuation:no_comma"],
              "kwargs": [{}]}]  # fmt: skip
    reference = chat_reference(
        teacher, tok, ["The quick fox?", "A river runs?"], instructions=items, max_new_tokens=6,
        instruction_max_new_tokens=7,
    )  # fmt: skip
    score = evaluate_chat_retention(student, tokenizer=tok, reference=reference, scorer=teacher)

    own = score.answers + score.instruction_answers
    assert len(score.answers) == 2 and len(score.instruction_answers) == 1
    assert all(len(a) <= 6 for a in score.answers) and len(score.instruction_answers[0]) <= 7
    assert score.finish_rate == pytest.approx(sum(bool(a) and a[-1] in stop for a in own) / 3)
    assert score.mean_length == pytest.approx(sum(map(len, own)) / 3)
    texts = [tok.decode(a, skip_special_tokens=True).strip() for a in own]
    assert score.refusal_rate == pytest.approx(sum(map(is_refusal, texts)) / 3)
    # IFEval's no_comma by hand: followed when the (non-empty) answer has no comma
    followed = bool(texts[2]) and "," not in texts[2]
    assert score.instruction_prompt_accuracy == score.instruction_accuracy == float(followed)
    # the reverse-KL proxy by hand: the teacher's mean log-probability of the student's own answer tokens
    logprob = count = 0
    prompts = reference.prompt_ids + reference.instruction_prompt_ids
    with torch.no_grad():
        for prompt_ids, answer in zip(prompts, own):
            logits = teacher(input_ids=torch.tensor([prompt_ids + answer])).logits[0].float()
            for k, token in enumerate(answer):
                logprob += torch.log_softmax(logits[len(prompt_ids) + k - 1], -1)[token].item()
                count += 1
    assert score.teacher_logprob == pytest.approx(logprob / count, rel=1e-5)
    assert reference.instruction_prompt_ids == [render_prompt(tok, items[0]["prompt"])]
    assert reference.stop_ids == stop

    # the teacher's own figures come with the reference; the table reads the student's against them
    teacher_score = reference.teacher
    assert teacher_score.teacher_logprob == pytest.approx(-_mean_nll(teacher, reference), rel=1e-5)
    table = chat_retention_table({"teacher": teacher_score, "recovered": score})
    assert table["recovered"]["length_ratio"] == pytest.approx(score.mean_length / teacher_score.mean_length)
    assert table["teacher"]["length_ratio"] == pytest.approx(1.0)


def test_the_table_reads_each_own_answer_figure_against_the_teachers():
    from hf_recover.base.chat_retention import ChatRetention

    def score(finish, length, prompt_level, each):
        return ChatRetention(
            2.0, 0.7, 0.5, 0.1, 1.0, 10, finish_rate=finish, mean_length=length,
            instruction_prompt_accuracy=prompt_level, instruction_accuracy=each,
        )  # fmt: skip

    table = chat_retention_table({"teacher": score(0.8, 100.0, 0.2, 0.4), "recovered": score(0.6, 150.0, 0.1, 0.3)})
    recovered = table["recovered"]
    assert recovered["finish_ratio"] == pytest.approx(0.75) and recovered["length_ratio"] == pytest.approx(1.5)
    assert recovered["instruction_prompt_ratio"] == pytest.approx(0.5)
    assert recovered["instruction_ratio"] == pytest.approx(0.75)
    zero = chat_retention_table({"teacher": score(0.0, 100.0, 0.0, 0.4), "recovered": score(0.6, 150.0, 0.1, 0.3)})
    assert "finish_ratio" not in zero["recovered"] and "instruction_prompt_ratio" not in zero["recovered"]


def _mean_nll(model, reference):
    """Mean NLL of the reference's own answers (both prompt sets) under `model`, token by token."""
    total = count = 0
    pairs = list(zip(reference.prompt_ids, reference.answer_ids)) + list(
        zip(reference.instruction_prompt_ids, reference.instruction_answer_ids)
    )
    with torch.no_grad():
        for prompt_ids, answer in pairs:
            logits = model(input_ids=torch.tensor([prompt_ids + answer])).logits[0].float()
            for k, token in enumerate(answer):
                total -= torch.log_softmax(logits[len(prompt_ids) + k - 1], -1)[token].item()
                count += 1
    return total / count
