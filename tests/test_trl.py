"""TRL integration: `DistillationSFTTrainer` keeps SFT's data handling, loss and metrics and adds the teacher
terms. Skipped without TRL (the `trl` extra, part of `dev`)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model, build_tiny_tokenizer
from datasets import Dataset

pytest.importorskip("trl", minversion="1.16")

from trl import SFTConfig  # noqa: E402

from hf_recover import DistillationConfig, prune_depth  # noqa: E402
from hf_recover.base.constants import IGNORE_INDEX  # noqa: E402
from hf_recover.integrations.trl import DistillationSFTConfig, DistillationSFTTrainer  # noqa: E402

# `{% generation %}` marks the assistant's tokens: SFT's assistant_only_loss trains on them only.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}assistant: {% generation %}{{ message['content'] }}</s>{% endgeneration %}"
    "{% else %}{{ message['role'] }}: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

CHATS = [
    ("What does pruning remove?", "Whole transformer blocks or the neurons of their feed-forward layers."),
    ("What is perplexity?", "The exponential of the average negative log-likelihood per predicted token."),
    ("Who imitates the teacher?", "A small student imitates the outputs of a larger teacher."),
    ("Where do farmers plant wheat?", "Along the fertile banks of the river in the valley."),
]


def chat_dataset() -> Dataset:
    messages = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in CHATS * 2]
    return Dataset.from_dict({"messages": messages})


def prompt_completion_dataset() -> Dataset:
    """Conversational prompt/completion pairs: SFT's `completion_only_loss` trains on the completions only."""
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": q}] for q, _ in CHATS * 2],
            "completion": [[{"role": "assistant", "content": a}] for _, a in CHATS * 2],
        }
    )


def chat_tokenizer():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_trainer(tmp_path, dataset: Dataset | None = None, **overrides) -> DistillationSFTTrainer:
    teacher = build_tiny_model()
    student, _ = prune_depth(teacher, remove=[1, 4])
    values = dict(
        output_dir=str(tmp_path / "sft"),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        save_strategy="no",
        disable_tqdm=True,
        assistant_only_loss=True,
        max_length=64,
        alpha=0.4,
        beta=0.6,
        temperature=2.0,
        seed=0,
    )
    values.update(overrides)
    return DistillationSFTTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillationSFTConfig(**values),
        train_dataset=dataset if dataset is not None else chat_dataset(),
        eval_dataset=chat_dataset().select(range(4)),
        processing_class=chat_tokenizer(),
    )


def hand_loss(student, teacher, batch, alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """alpha·CE + beta·T²·KL(p‖q) on the tokens whose labels are kept, written out with torch alone."""
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE_INDEX
    student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ce = F.cross_entropy(student_logits[valid].float(), labels[valid])
    teacher_logp = F.log_softmax(teacher_logits[valid].float() / temperature, dim=-1)
    student_logp = F.log_softmax(student_logits[valid].float() / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()
    return alpha * ce + beta * temperature**2 * kl


def test_config_keeps_every_default_of_both_configs():
    merged = {f.name: f for f in dataclasses.fields(DistillationSFTConfig)}
    for f in dataclasses.fields(SFTConfig):
        assert merged[f.name].default == f.default, f.name
    sft_names = {f.name for f in dataclasses.fields(SFTConfig)}
    for f in dataclasses.fields(DistillationConfig):
        if f.name not in sft_names:
            assert merged[f.name].default == f.default, f.name


def test_bad_distillation_values_still_fail(tmp_path):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillationSFTConfig(output_dir=str(tmp_path), temperature=0.0, report_to="none")


@pytest.mark.parametrize("data", ["messages", "prompt_completion"])
def test_loss_and_gradients_equal_the_hand_formula(tmp_path, data):
    if data == "messages":  # the assistant's turns only, marked by the template's generation tags
        trainer = make_trainer(tmp_path)
    else:  # the completions only (SFT's completion_only_loss, on by default for prompt/completion data)
        trainer = make_trainer(tmp_path, prompt_completion_dataset(), assistant_only_loss=False)
    batch = next(iter(trainer.get_train_dataloader()))
    # SFT's chat handling: the template was applied and the prompt tokens are not trained on
    attended = batch["attention_mask"].bool()
    assert (batch["labels"][attended] == IGNORE_INDEX).any() and (batch["labels"][attended] != IGNORE_INDEX).any()
    first_trained = (batch["labels"][0] != IGNORE_INDEX).nonzero()[0].item()
    assert chat_tokenizer().decode(batch["input_ids"][0, :first_trained]).startswith("user: ")

    model = trainer.model
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    expected = hand_loss(model, trainer.teacher_model, batch, alpha=0.4, beta=0.6, temperature=2.0)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert got.keys() == {name for name, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused_cross_entropy", [True, False])
def test_train_and_evaluate_log_sfts_metrics_and_the_teacher_terms(tmp_path, fused_cross_entropy):
    trainer = make_trainer(tmp_path, fused_cross_entropy=fused_cross_entropy)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        for key in ("mean_token_accuracy", "entropy", "num_tokens", "ce", "kd"):
            assert isinstance(log[key], float), key
        assert 0.0 <= log["mean_token_accuracy"] <= 1.0 and log["entropy"] > 0
        # the logged objective is the weighted sum of the logged terms (one micro-batch per step)
        assert log["loss"] == pytest.approx(0.4 * log["ce"] + 0.6 * 4.0 * log["kd"], rel=1e-3)

    metrics = trainer.evaluate()
    for key in ("eval_mean_token_accuracy", "eval_entropy", "eval_ce", "eval_kd", "eval_distillation_loss"):
        assert isinstance(metrics[key], float), key
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_ce"], rel=1e-5)  # the student's own loss
    assert metrics["eval_distillation_loss"] == pytest.approx(
        0.4 * metrics["eval_ce"] + 0.6 * 4.0 * metrics["eval_kd"], rel=1e-5
    )


def test_dft_loss_type_is_sfts(tmp_path):
    """`loss_type="dft"` stays SFT's: the CE term is its probability-weighted NLL, not the plain one."""
    trainer = make_trainer(tmp_path, loss_type="dft", beta=0.0, alpha=1.0)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        labels = batch["labels"][:, 1:]
        valid = labels != IGNORE_INDEX
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        logp = F.log_softmax(logits[valid].float(), dim=-1).gather(-1, labels[valid][:, None]).squeeze(-1)
    torch.testing.assert_close(loss, -(logp * logp.exp()).mean(), rtol=1e-5, atol=1e-6)


def test_import_hf_recover_does_not_import_trl():
    code = "import sys, hf_recover; hf_recover.DistillationTrainer; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_packing_trains_with_the_teacher_terms(tmp_path):
    trainer = make_trainer(tmp_path, packing=True, max_length=48)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch  # SFT's packed (padding-free) batches
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(log["kd"] > 0 and "mean_token_accuracy" in log for log in logs)


def test_a_plain_sft_config_is_upgraded_keeping_its_values(tmp_path):
    teacher = build_tiny_model()
    student, _ = prune_depth(teacher, remove=[1, 4])
    sft_args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, assistant_only_loss=True)
    trainer = DistillationSFTTrainer(
        model=student,
        teacher_model=teacher,
        args=sft_args,
        train_dataset=chat_dataset(),
        processing_class=chat_tokenizer(),
    )
    assert type(trainer.args) is DistillationSFTConfig
    assert trainer.args.assistant_only_loss and trainer.args.learning_rate == sft_args.learning_rate
    assert trainer.args.beta == DistillationConfig.__dataclass_fields__["beta"].default
    with pytest.raises(ValueError, match="args must be a DistillationSFTConfig"):
        DistillationSFTTrainer(model=student, teacher_model=teacher, args={"alpha": 1.0}, train_dataset=chat_dataset())


def test_hidden_alignment_and_fdd_read_the_students_hidden_states(tmp_path):
    """gamma/delta need the student's hidden states, which SFT's forward computes but does not return."""
    trainer = make_trainer(tmp_path, gamma=0.1, delta=0.1)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(log["align"] > 0 and log["fdd"] > 0 and "mean_token_accuracy" in log for log in logs)
    assert logs[0]["loss"] == pytest.approx(
        0.4 * logs[0]["ce"] + 0.6 * 4.0 * logs[0]["kd"] + 0.1 * logs[0]["align"] + 0.1 * logs[0]["fdd"], rel=1e-3
    )
