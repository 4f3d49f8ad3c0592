"""Training on chat examples beside text: the loss (CE and KD alike) is taken on the assistant's tokens only, rows of
different lengths batch together, and a teacher cache of chat rows trains the same way."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model, make_args
from datasets import Dataset

from hf_recover import DistillationTrainer
from hf_recover.base.chat import prepare_chat_dataset
from hf_recover.base.constants import IGNORE_INDEX
from hf_recover.base.data import mix_recovery_datasets, prepare_recovery_dataset

CONVERSATIONS = [
    [{"role": "user", "content": "The quick fox?"}, {"role": "assistant", "content": "It jumps over the dog."}],
    [{"role": "user", "content": "A river runs?"}, {"role": "assistant", "content": "Through the valley."}],
    [{"role": "user", "content": "Tell me a rhyme."}, {"role": "assistant", "content": "She sells sea shells."}],
]


@pytest.fixture
def mixture(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    chat = prepare_chat_dataset(Dataset.from_dict({"messages": CONVERSATIONS}), tok, max_length=64)
    text = prepare_recovery_dataset(
        Dataset.from_dict({"text": ["The quick brown fox jumps over the lazy dog." * 3]}), tok, max_length=24
    )
    tokens = {"chat": sum(len(r) for r in chat["input_ids"]), "text": sum(len(r) for r in text["input_ids"])}
    return mix_recovery_datasets({"chat": chat, "text": text}, tokens, seed=0)


def _by_hand(student, teacher, batch, alpha, beta, temperature):
    """α·CE + β·T²·KL(teacher ‖ student) averaged over the positions whose next label is trained, nothing else."""
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = kd = count = 0
    for row in range(batch["input_ids"].shape[0]):
        for t in range(batch["input_ids"].shape[1] - 1):
            target = int(batch["labels"][row, t + 1])
            if target == IGNORE_INDEX:
                continue
            ce = ce - F.log_softmax(s_logits[row, t], -1)[target]
            p = F.softmax(t_logits[row, t] / temperature, -1)
            kd = kd + (p * (p.log() - F.log_softmax(s_logits[row, t] / temperature, -1))).sum()
            count += 1
    return alpha * ce / count + beta * temperature**2 * kd / count, count


def test_chat_rows_train_on_the_assistants_tokens_only(tmp_path, tiny_chat_tokenizer, mixture):
    tok = tiny_chat_tokenizer
    teacher, student = build_tiny_model(vocab_size=len(tok), seed=0), build_tiny_model(vocab_size=len(tok), seed=1)
    args = make_args(tmp_path, alpha=0.4, beta=0.6, temperature=2.0, fused_lm_head=False)
    trainer = DistillationTrainer(student, teacher, args, train_dataset=mixture, processing_class=tok)
    rows = [mixture[i] for i in range(len(mixture))]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # chat rows and text blocks of other lengths
    batch = trainer.data_collator([{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()  # padding is never trained on
    loss = trainer.compute_loss(student, dict(batch))
    expected, count = _by_hand(student, teacher, batch, 0.4, 0.6, 2.0)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    chat_tokens = sum(sum(label != IGNORE_INDEX for label in r["labels"]) for r in rows if r["prompt_length"] > 0)
    prompt_tokens = sum(r["prompt_length"] for r in rows if r["prompt_length"] > 0)
    assert chat_tokens > 0 and prompt_tokens > chat_tokens / 2  # the prompts were there, and were left out
    # the prompt positions get no gradient: changing what a masked label says changes nothing
    changed = dict(batch)
    changed["labels"] = batch["labels"].clone()
    assert torch.equal(trainer.compute_loss(student, changed), loss)


def test_a_teacher_cache_of_chat_rows_trains_on_the_assistants_tokens(tmp_path, tiny_chat_tokenizer, mixture):
    from hf_recover import cache_teacher_outputs
    from hf_recover.base.losses import TopKTeacher, distillation_loss

    tok = tiny_chat_tokenizer
    teacher, student = build_tiny_model(vocab_size=len(tok), seed=0), build_tiny_model(vocab_size=len(tok), seed=1)
    rows = mixture.remove_columns("prompt_length")
    folder = cache_teacher_outputs(teacher, rows, tmp_path / "cache", top_k=len(tok), tail_samples=0, tokenizer=tok)
    args = make_args(tmp_path, alpha=0.5, beta=0.5, temperature=2.0, per_device_train_batch_size=len(rows))
    trainer = DistillationTrainer(student, None, args, teacher_cache=folder, processing_class=tok)
    cached = trainer.train_dataset
    assert len({len(ids) for ids in cached["input_ids"]}) == 1  # padded to one length for the cached arrays
    batch = trainer.data_collator([cached[i] for i in range(len(cached))])
    labels = batch["labels"]
    assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    loss = trainer.compute_loss(student, dict(batch))
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    top = TopKTeacher(batch["teacher_top_ids"].long(), batch["teacher_top_logprobs"], batch["teacher_tail_logmass_T2"])
    expected = distillation_loss(logits, top, labels, ce_weight=0.5, kd_weight=0.5 * 4, temperature=2.0).loss
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    # with the whole vocabulary cached, the cache is the teacher itself: the loss is the online one
    online, _ = _by_hand(student, teacher, batch, 0.5, 0.5, 2.0)
    torch.testing.assert_close(loss, online, rtol=1e-3, atol=1e-4)


# -- on-policy distillation (lmbda) ---------------------------------------------------------------------------------


def test_an_on_policy_batch_is_the_students_own_answers_with_labels_on_them(tiny_chat_tokenizer, mixture):
    from transformers import DataCollatorForSeq2Seq

    from hf_recover.base.chat import end_of_turn_ids
    from hf_recover.base.generation import Sampling, generate_completions
    from hf_recover.distill.on_policy import on_policy_batch

    tok = tiny_chat_tokenizer
    student = build_tiny_model(vocab_size=len(tok), seed=1)
    batch = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE_INDEX)([mixture[i] for i in range(len(mixture))])
    sampling = Sampling(max_new_tokens=5)
    answered = on_policy_batch(student, batch, tok, sampling, seed=0)
    chat_rows = [r for r in range(len(mixture)) if mixture[r]["prompt_length"] > 0]
    assert answered["input_ids"].shape[0] == len(chat_rows)  # the text rows left the batch
    for i, r in enumerate(chat_rows):
        prompt = mixture[r]["input_ids"][: mixture[r]["prompt_length"]]
        answer = generate_completions(
            student, [prompt], stop_ids=end_of_turn_ids(student, tok), pad_id=0, sampling=sampling
        )[0]
        length = len(prompt) + len(answer)
        assert answered["input_ids"][i, :length].tolist() == prompt + answer
        assert answered["labels"][i, : len(prompt)].eq(IGNORE_INDEX).all()
        assert answered["labels"][i, len(prompt) : length].tolist() == answer
        assert answered["attention_mask"][i].sum() == length
    text_only = {k: v[[r for r in range(len(mixture)) if r not in chat_rows]] for k, v in batch.items()}
    assert on_policy_batch(student, text_only, tok, sampling, seed=0) is None


def test_on_policy_steps_train_on_the_divergence_alone(tmp_path, tiny_chat_tokenizer, mixture, monkeypatch):
    import hf_recover.distill.trainer as trainer_module

    tok = tiny_chat_tokenizer
    teacher, student = build_tiny_model(vocab_size=len(tok), seed=0), build_tiny_model(vocab_size=len(tok), seed=1)
    args = make_args(
        tmp_path, alpha=0.5, beta=0.5, temperature=2.0, lmbda=1.0, on_policy_max_new_tokens=6, fused_lm_head=False
    )
    trainer = DistillationTrainer(student, teacher, args, train_dataset=mixture, processing_class=tok)
    assert "prompt_length" in trainer.get_train_dataloader().dataset.column_names  # kept for on-policy
    seen = []
    original = trainer_module.on_policy_batch
    monkeypatch.setattr(trainer_module, "on_policy_batch", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # as train() sets it
    loss = trainer.training_step(trainer.model, batch)
    (answered,) = seen
    expected, _ = _by_hand(student, teacher, answered, 0.0, 0.5, 2.0)  # no cross-entropy on its own answers
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(lmbda=1.5), r"lmbda is the share of on-policy batches"),
        (dict(lmbda=0.5, beta=0.0, alpha=1.0), "set beta > 0"),
        (dict(lmbda=0.5, on_policy_temperature=0.0), "on_policy_temperature > 0"),
    ],
)
def test_bad_on_policy_settings_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)


def test_on_policy_needs_a_teacher_not_a_cache(tmp_path, tiny_chat_tokenizer, mixture):
    from hf_recover import cache_teacher_outputs

    tok = tiny_chat_tokenizer
    teacher, student = build_tiny_model(vocab_size=len(tok), seed=0), build_tiny_model(vocab_size=len(tok), seed=1)
    folder = cache_teacher_outputs(
        teacher, mixture.remove_columns("prompt_length"), tmp_path / "c", top_k=8, tokenizer=tok
    )
    with pytest.raises(ValueError, match="a teacher cache cannot"):
        DistillationTrainer(student, None, make_args(tmp_path, lmbda=0.5), teacher_cache=folder, processing_class=tok)


def test_a_clipped_on_policy_step_counts_each_token_at_most_the_clip(tmp_path, tiny_chat_tokenizer, mixture):
    tok = tiny_chat_tokenizer
    teacher, student = build_tiny_model(vocab_size=len(tok), seed=0), build_tiny_model(vocab_size=len(tok), seed=1)
    clip = 1e-6  # below every token's divergence: each counts the clip, none gives a gradient
    args = make_args(
        tmp_path, alpha=0.5, beta=0.5, temperature=2.0, lmbda=1.0, on_policy_max_new_tokens=6, on_policy_kl_clip=clip,
        fused_lm_head=False,
    )  # fmt: skip
    trainer = DistillationTrainer(student, teacher, args, train_dataset=mixture, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1
    student.zero_grad()
    loss = trainer.training_step(trainer.model, batch)
    assert loss.item() == pytest.approx(0.5 * 2.0**2 * clip, rel=1e-4)  # beta · T² · clip, no cross-entropy
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in student.parameters())
    with pytest.raises(ValueError, match="on_policy_kl_clip must be > 0"):
        make_args(tmp_path, lmbda=0.5, on_policy_kl_clip=0.0)


def test_run_recovery_runs_an_on_policy_phase_from_its_warm_start(tmp_path, tiny_chat_tokenizer, mixture, monkeypatch):
    import hf_recover.distill.trainer as trainer_module
    import hf_recover.recovery as recovery
    from hf_recover import DistillationConfig

    tok = tiny_chat_tokenizer
    teacher, student = build_tiny_model(vocab_size=len(tok), seed=0), build_tiny_model(vocab_size=len(tok), seed=1)
    answered = []
    original = trainer_module.on_policy_batch
    monkeypatch.setattr(trainer_module, "on_policy_batch", lambda *a, **k: answered.append(1) or original(*a, **k))
    chat_rows = mixture.filter(lambda n: n > 0, input_columns="prompt_length")
    phase = DistillationConfig.for_on_policy_phase(
        output_dir=str(tmp_path / "phase"), max_steps=2, lmbda=1.0, on_policy_max_new_tokens=4, report_to="none",
        use_cpu=True, logging_steps=1,
    )  # fmt: skip
    assert (phase.alpha, phase.divergence, phase.temperature, phase.on_policy_kl_clip) == (0.0, "reverse_kl", 1.0, 1.0)
    args = make_args(tmp_path, max_steps=1, logging_steps=1)
    _, result = recovery.run_recovery(
        teacher=teacher, student=student, tokenizer=tok, args=args, train_dataset=mixture,
        eval_splits={}, save=False, on_policy=(phase, chat_rows),
    )  # fmt: skip
    assert len(answered) == 2  # every step of the phase answered its prompts
    assert result.train_steps == 3
    assert [e["step"] for e in result.log_history if "loss" in e] == [1, 2, 3]  # the phase's steps follow on


def test_run_recovery_scores_the_recovered_students_own_answers_with_the_teacher(
    tmp_path, tiny_chat_tokenizer, mixture
):
    import hf_recover.recovery as recovery
    from hf_recover.base.chat_retention import chat_reference

    tok = tiny_chat_tokenizer
    teacher, student = build_tiny_model(vocab_size=len(tok), seed=0), build_tiny_model(vocab_size=len(tok), seed=1)
    chat = chat_reference(teacher, tok, ["The quick fox?", "A river runs?"], max_new_tokens=5)
    _, result = recovery.run_recovery(
        teacher=teacher, student=student, tokenizer=tok, args=make_args(tmp_path, max_steps=1), train_dataset=mixture,
        eval_splits={}, save=False, chat=chat, examples=1,
    )  # fmt: skip
    recovered = result.assistant["recovered"]
    assert recovered["teacher_logprob"] is not None and recovered["teacher_logprob"] < 0
    assert recovered["finish_rate"] is not None and "length_ratio" in recovered
    assert result.answers[0]["recovered"] is not None and "teacher" in result.answers[0]
