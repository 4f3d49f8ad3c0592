"""The trainer's fused lm_head: both models' logits are left to the loss, chunk by chunk, and training is the same
as through whole logits (losses, gradients of every trainable parameter, weights after 3 steps)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, TINY_TEXTS, build_tiny_model, build_tiny_tokenizer
from conftest import make_args as shared_args
from datasets import Dataset

from hf_recover import DistillationTrainer, prepare_recovery_dataset

VOCAB = 320


@pytest.fixture(scope="module")
def data():
    texts = [text[: 12 + 7 * i] for i, text in enumerate(TINY_TEXTS * 2)]
    return prepare_recovery_dataset(
        Dataset.from_dict({"text": texts}), build_tiny_tokenizer(), max_length=24, packing=False
    )


def make_args(tmp_path, *, defaults: tuple[str, ...] = (), **overrides):
    """The tests' config; the fields named in `defaults` are left at DistillationConfig's defaults."""
    kwargs = dict(
        optim="sgd",  # Adam would turn round-off in near-zero gradients (unseen tokens' rows) into full-size steps
        learning_rate=0.5,
        kd_chunk_size=7,  # several chunks per batch, crossing rows
        fused_lm_head=True,
    )
    kwargs.update(overrides)
    return shared_args(tmp_path, **{name: value for name, value in kwargs.items() if name not in defaults})


def train_both_ways(tmp_path, data, student, teacher, **overrides):
    """Train copies of `student` for 3 steps with and without the fused lm_head; return both trainers."""
    trainers = {}
    for fused in (True, False):
        args = make_args(tmp_path, fused_lm_head=fused, **overrides)
        trainer = DistillationTrainer(copy.deepcopy(student), copy.deepcopy(teacher), args, train_dataset=data)
        assert trainer._fused_heads == (fused, fused)
        trainer.train()
        trainers[fused] = trainer
    return trainers[True], trainers[False]


def assert_same_training(fused, plain, rtol=1e-4, atol=1e-6):
    for key in ("loss", "ce", "kd"):
        got = [log[key] for log in fused.state.log_history if key in log]
        want = [log[key] for log in plain.state.log_history if key in log]
        assert len(got) == 3
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=rtol, atol=atol)
    for (name, got), want in zip(fused.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_trains_as_through_whole_logits(tmp_path, data, architecture):
    overrides = {"final_logit_softcapping": 2.0} if architecture == "gemma3_text" else {}
    teacher = build_tiny_model(architecture, seed=1, **overrides)
    student = build_tiny_model(architecture, seed=2, num_hidden_layers=3, **overrides)
    assert_same_training(*train_both_ways(tmp_path, data, student, teacher, alpha=0.4, beta=0.6, temperature=1.5))


def test_the_default_path_is_fused_with_blocks_of_chunks(tmp_path, data, monkeypatch):
    """Without `fused_lm_head` or `kd_chunk_size`, training is fused, its lm_heads run in blocks of 17 positions
    walked in chunks of 5 (sizes scaled down to the tiny models), and it equals training through whole logits."""
    from hf_recover.base.losses import chunking

    monkeypatch.setattr(chunking, "CPU_CHUNK_ELEMENTS", 5 * VOCAB)
    monkeypatch.setattr(chunking, "HEAD_BLOCK_TOKENS", 17)
    teacher, student = build_tiny_model(seed=1), build_tiny_model(seed=2, num_hidden_layers=3)
    trainers = {}
    for name, args in (
        ("default", make_args(tmp_path, defaults=("fused_lm_head", "kd_chunk_size"))),
        ("logits", make_args(tmp_path, fused_lm_head=False)),
    ):
        trainers[name] = DistillationTrainer(copy.deepcopy(student), copy.deepcopy(teacher), args, train_dataset=data)
        trainers[name].train()
    assert trainers["default"]._fused_heads == (True, True)
    assert trainers["logits"]._fused_heads == (False, False)
    assert_same_training(trainers["default"], trainers["logits"])


def test_neither_model_keeps_every_layers_hidden_states(tmp_path, data):
    """The fused path reads the final norm's output through a hook: without alignment, neither forward is asked for
    `output_hidden_states` (which would hold `num_layers` hidden states until the loss is computed)."""
    teacher, student = build_tiny_model(seed=1), build_tiny_model(seed=2, num_hidden_layers=3)
    trainer = DistillationTrainer(student, teacher, make_args(tmp_path), train_dataset=data)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))  # before forward is wrapped
    calls = []
    for model in (trainer.model, trainer.teacher_model):
        forward = model.forward
        model.forward = lambda *a, _forward=forward, **k: calls.append(k) or _forward(*a, **k)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert len(calls) == 2 and all(not call.get("output_hidden_states") for call in calls)
    assert all(call["logits_to_keep"].numel() == 0 for call in calls)  # neither lm_head computes anything
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("divergence", "params"),
    [
        ("reverse_kl", {}),
        ("skew_forward_kl", {"skew_lambda": 0.3}),
        ("skew_reverse_kl", {"skew_lambda": 0.3}),
        ("generalized_jsd", {"jsd_beta": 0.3}),
        ("total_variation", {}),
    ],
)
def test_every_divergence(tmp_path, data, divergence, params):
    teacher, student = build_tiny_model(seed=1), build_tiny_model(seed=2, num_hidden_layers=3)
    fused, plain = train_both_ways(tmp_path, data, student, teacher, divergence=divergence, **params)
    assert_same_training(fused, plain)


def test_untied_heads_gradient_accumulation_and_alignment(tmp_path, data):
    teacher = build_tiny_model(seed=1, tie_word_embeddings=False)
    student = build_tiny_model(seed=2, num_hidden_layers=3, tie_word_embeddings=False)
    assert student.lm_head.weight is not student.model.embed_tokens.weight
    fused, plain = train_both_ways(
        tmp_path, data, student, teacher, per_device_train_batch_size=2, gradient_accumulation_steps=2, gamma=0.3,
        layer_map="uniform",
    )  # fmt: skip
    assert_same_training(fused, plain)


def test_gradients_of_lm_head_embeddings_and_last_block_match(tmp_path, data):
    teacher, student = build_tiny_model(seed=1), build_tiny_model(seed=2, num_hidden_layers=3)
    grads = {}
    for fused in (True, False):
        trainer = DistillationTrainer(
            copy.deepcopy(student), teacher, make_args(tmp_path, fused_lm_head=fused), train_dataset=data
        )
        trainer.model.train()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.compute_loss(trainer.model, batch).backward()
        grads[fused] = {name: p.grad for name, p in trainer.model.named_parameters()}
    for name in ("model.embed_tokens.weight", "model.layers.2.mlp.down_proj.weight", "model.norm.weight"):
        assert grads[True][name].abs().max() > 0
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-7, msg=name)


def test_lora_student_with_a_frozen_lm_head(tmp_path, data):
    from peft import LoraConfig, get_peft_model

    teacher = build_tiny_model(seed=1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainers = []
    for fused in (True, False):
        torch.manual_seed(0)
        student = get_peft_model(build_tiny_model(seed=2, num_hidden_layers=3), lora)
        trainer = DistillationTrainer(student, teacher, make_args(tmp_path, fused_lm_head=fused), train_dataset=data)
        assert trainer._fused_heads == (fused, fused)
        trainer.train()
        trainers.append(trainer)
    assert_same_training(*trainers)


def test_an_adapted_lm_head_keeps_its_logits(tmp_path, data):
    """An lm_head wrapped by PEFT computes more than weight @ hidden: that student keeps the logits path."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    student = get_peft_model(build_tiny_model(seed=2, num_hidden_layers=3, tie_word_embeddings=False), lora)
    trainer = DistillationTrainer(student, build_tiny_model(seed=1), make_args(tmp_path), train_dataset=data)
    assert trainer._fused_heads == (False, True)
    trainer.train()  # and it still trains, the teacher's side fused
    assert all(log["loss"] > 0 for log in trainer.state.log_history if "loss" in log)


def test_no_tensor_the_size_of_the_logits_in_a_training_step(tmp_path, data):
    """Besides parameters and their gradients, nothing larger than one chunk of vocabulary is allocated."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    teacher, student = build_tiny_model(seed=1), build_tiny_model(seed=2, num_hidden_layers=3)
    chunk = 7
    trainer = DistillationTrainer(student, teacher, make_args(tmp_path, kd_chunk_size=chunk), train_dataset=data)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    tokens = batch["input_ids"].numel()
    assert tokens > 2 * chunk

    parameters = {p.untyped_storage().data_ptr() for m in (student, teacher) for p in m.parameters()}

    class LargestLogits(TorchDispatchMode):
        """Rows of vocabulary-wide float32 memory allocated at once (views of parameters and zero-stride
        stand-ins allocate nothing)."""

        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == VOCAB:
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in parameters:
                        self.rows = max(self.rows, storage.nbytes() // (4 * VOCAB))
            return out

    trainer.model.train()
    with LargestLogits() as recorder:
        trainer.compute_loss(trainer.model, batch).backward()  # forward and backward of a training step
    assert 0 < recorder.rows <= chunk  # the logits would be `tokens` rows
    trainer._fused_heads = (False, False)  # what fused_lm_head=False decides
    with LargestLogits() as recorder:
        trainer.compute_loss(trainer.model, batch).backward()
    assert recorder.rows >= tokens  # the reference path does build them: the check can fail


def test_bf16_mixed_precision(tmp_path, data):
    """Under CPU bf16 autocast the student's hidden states are bfloat16 and its lm_head float32: the fused head
    computes each chunk in the weight's dtype, and training follows the logits path within bf16 round-off."""
    teacher, student = build_tiny_model(seed=1), build_tiny_model(seed=2, num_hidden_layers=3)
    fused, plain = train_both_ways(tmp_path, data, student, teacher, bf16=True)
    for key in ("loss", "ce", "kd"):
        got = torch.tensor([log[key] for log in fused.state.log_history if key in log])
        want = torch.tensor([log[key] for log in plain.state.log_history if key in log])
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)
    for got, want in zip(fused.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_head_logits_are_the_models_own_logits():
    """`head_logits` (what the TRL integration builds the student's logits with) gives the forward's logits from the
    final norm's output, soft-capped as Gemma caps them."""
    from hf_recover.distill.lm_head import final_hidden_states, head_logits

    model = build_tiny_model(seed=0, vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with final_hidden_states(model, True) as final:
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(head_logits(model, final[0]), logits)
    model.config.final_logit_softcapping = 0.5
    capped = head_logits(model, final[0])
    torch.testing.assert_close(capped, 0.5 * torch.tanh(logits / 0.5))
    assert capped.abs().max() < 0.5 < logits.abs().max()


def test_an_lm_head_given_no_position_skips_its_weight(monkeypatch):
    """Inside `final_hidden_states`, a forward that keeps no position (`no_logits`) leaves the lm_head's weight alone
    (under autocast `nn.Linear` would cast the whole of it first), while a forward that keeps positions gives the
    model's own logits; the head's forward is its own again after the block."""
    import torch.nn.functional as F

    from hf_recover.distill.lm_head import final_hidden_states, no_logits

    model = build_tiny_model(seed=0, vocab_size=VOCAB)
    head = model.get_output_embeddings()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids).logits
    calls, linear = [], F.linear

    def counted(x, weight, *args, **kwargs):
        calls.append(weight is head.weight)
        return linear(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "linear", counted)
    with torch.autocast("cpu", dtype=torch.bfloat16), final_hidden_states(model, True) as final:
        outputs = model(input_ids=ids, logits_to_keep=no_logits(ids.device))
    assert not any(calls) and outputs.logits.shape == (2, 0, VOCAB)
    assert final[0].shape == (2, 7, model.config.hidden_size)
    with final_hidden_states(model, True):
        torch.testing.assert_close(model(input_ids=ids).logits, want)
    assert calls.count(True) == 1 and "forward" not in head.__dict__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, logits_to_keep=no_logits(ids.device))
    assert calls.count(True) == 2  # without the block, the head runs (the check can fail)
