"""The dataset card of a teacher data folder (`README.md` beside its shards): what was written, how, and what its
answers are like (`hf_recover.distill.answer_filter.answer_report`)."""

from __future__ import annotations

CARD_TEMPLATE = """
# Teacher data of {teacher}

Recovery data written by `{teacher}` itself with hf_recover's `build_teacher_data`: {what}. Train on it with
`hf-recover recover --teacher_data FOLDER` or `hf_recover.load_teacher_data`.

{answers}
Seed {seed}; teacher weights sha256 `{fingerprint}`.
"""

ANSWERS_TEMPLATE = """## The answers

{answers} answers ({per_prompt} per prompt, {sampling}) to {prompts} prompts. Of all answers, {finished:.1%} end
with the end-of-turn token within {max_new_tokens} tokens, {refusals:.1%} refuse or apologise and {repetitive:.1%}
repeat more than {max_rate} of their 4-grams.{loops} The default answer filter (`GOOD_ANSWERS`: {kept_are}),
which recovery trains through unless told otherwise, keeps {kept_answers} answers to {kept_prompts} prompts,
{kept_mean_tokens:.0f} tokens each on average.
"""


def data_card(metadata: dict):
    """The `huggingface_hub.DatasetCard` of a finished teacher data build, from its metadata."""
    from huggingface_hub import DatasetCard, DatasetCardData

    sampling, report = metadata["answer_sampling"], metadata["answers"]
    drawn = "greedy" if sampling["temperature"] == 0 else f"sampled at T = {sampling['temperature']:g}"
    if sampling["temperature"] and sampling["top_p"] < 1:
        drawn += f", top-p {sampling['top_p']:g}"
    answers = ""
    if report:
        rate = report["filter"]["max_repeated_ngram_rate"]
        answers = ANSWERS_TEMPLATE.format(
            **report, per_prompt=metadata["answers_per_prompt"], sampling=drawn,
            max_new_tokens=sampling["max_new_tokens"],
            loops=" Answers stuck in a loop were cut where the loop was found (unfinished)." if metadata.get(
                "stop_loops"
            ) else "", max_rate="100%" if rate is None else f"{rate:.0%}", kept_are=_kept_are(report["filter"]),
        )  # fmt: skip
    what = [f"answers to {metadata['prompts']} prompts"] if metadata["num_prompts"] else []
    what += [f"{metadata['num_samples']} unconditional samples"] if metadata["num_samples"] else []
    body = CARD_TEMPLATE.format(
        teacher=metadata["teacher"], what=" and ".join(what), answers=answers, seed=metadata["seed"],
        fingerprint=metadata["teacher_fingerprint"],
    )  # fmt: skip
    data = DatasetCardData(tags=["hf-recover", "knowledge-distillation", "teacher-data"])
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _kept_are(answer_filter: dict) -> str:
    """What the answers an `AnswerFilter` (as a dict) keeps are, in words."""
    words = ["finished"] if answer_filter["finished_only"] else []
    words += ["no refusal"] if answer_filter["drop_refusals"] else []
    words += ["no loop"] if answer_filter["max_repeated_ngram_rate"] is not None else []
    if answer_filter.get("max_answer_tokens") is not None:  # absent from the cards of earlier builds
        words.append(f"at most {answer_filter['max_answer_tokens']} tokens")
    if answer_filter["max_answers_per_prompt"] is not None:
        words.append(f"at most {answer_filter['max_answers_per_prompt']} per prompt")
    return ", ".join(words) or "every answer"
