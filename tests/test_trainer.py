"""DistillationTrainer on tiny models: the loss against the formula computed by hand, equality with plain
Trainer, gradient accumulation, resuming (projectors included), the frozen teacher, PEFT, saving, logging."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, TINY_TEXTS, build_tiny_model
from conftest import make_args as shared_args
from datasets import Dataset
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_recover import DistillationConfig, DistillationTrainer, PrunedConfig, prepare_recovery_dataset
from hf_recover.base.constants import PRUNED_CONFIG_NAME
from hf_recover.distill.trainer import PROJECTORS_NAME

NARROW = dict(num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def padded_data():
    """Rows of different lengths, right-padded: micro-batches hold different numbers of valid tokens."""
    from conftest import build_tiny_tokenizer

    texts = [text[: 12 + 7 * i] for i, text in enumerate(TINY_TEXTS * 2)]
    data = prepare_recovery_dataset(
        Dataset.from_dict({"text": texts}), build_tiny_tokenizer(), max_length=24, packing=False
    )
    counts = [sum(label != -100 for label in row[1:]) for row in data["labels"]]
    assert len(set(counts)) > 3, counts  # otherwise the accumulation test could not tell the normalisations apart
    return data


def make_args(tmp_path, name="out", cls=DistillationConfig, **overrides):
    return shared_args(tmp_path, name, cls, **{"per_device_eval_batch_size": 4, "learning_rate": 1e-3, **overrides})


def narrow_student(seed=2):
    return build_tiny_model(seed=seed, **NARROW)


def depth_prune(teacher, keep):
    """Test-local depth pruning (independent of hf_recover.prune): copy the kept blocks."""
    student = copy.deepcopy(teacher)
    student.model.layers = nn.ModuleList(student.model.layers[i] for i in keep)
    for index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = index
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    pruned = PrunedConfig(
        teacher_num_layers=teacher.config.num_hidden_layers, kept_layer_indices=list(keep), architecture="llama"
    )
    student.pruned_config = pruned
    return student, pruned


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def logged(trainer, key):
    """The values `key` was logged with, in order. A key never logged fails here: an empty list would make every
    `all(...)` over it true and two histories of it equal."""
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    assert values, f"{key!r} was never logged: {sorted({k for entry in trainer.state.log_history for k in entry})}"
    return values


def test_logged_fails_on_a_key_that_was_never_logged():
    from types import SimpleNamespace

    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}]))
    assert logged(trainer, "loss") == [1.0, 0.5]
    with pytest.raises(AssertionError, match="'kd' was never logged"):
        logged(trainer, "kd")


# -- the loss ----------------------------------------------------------------------------------------------


def raw_block_outputs(model, **inputs):
    """Forward `model` and return (outputs, [raw output of block 0, block 1, ...]) captured by hooks."""
    blocks = []
    hooks = [
        layer.register_forward_hook(lambda module, args, out: blocks.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.model.layers
    ]
    try:
        return model(**inputs), blocks
    finally:
        for hook in hooks:
            hook.remove()


def test_loss_equals_the_compound_formula_by_hand(tmp_path, padded_data):
    teacher, student = build_tiny_model(seed=1), narrow_student()
    with torch.no_grad():  # a final norm that is not the identity: its output is not the last block's output
        teacher.model.norm.weight.uniform_(0.5, 1.5)
        student.model.norm.weight.uniform_(0.5, 1.5)
    # The last student block maps to teacher block 4, not to the teacher's last block.
    args = make_args(tmp_path, alpha=0.3, beta=0.7, gamma=0.4, delta=0.2, temperature=1.7, layer_map="0,2,4")
    trainer = DistillationTrainer(student, teacher, args, train_dataset=padded_data)
    assert trainer.layer_map == [0, 2, 4] and len(trainer.projectors) == 3  # widths 16 -> 32
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    s, s_blocks = raw_block_outputs(student, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        t, t_blocks = raw_block_outputs(teacher, input_ids=ids, attention_mask=mask)
    valid = labels[:, 1:] != -100  # position i predicts label i + 1
    s_logits, t_logits = s.logits[:, :-1][valid], t.logits[:, :-1][valid]  # (N, V)
    ce = F.cross_entropy(s_logits, labels[:, 1:][valid])
    T = 1.7
    kd = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True, reduction="none")
    kd = kd.sum(-1).mean()
    projected = [trainer.projectors[i](s_blocks[i][:, :-1][valid]) for i in range(3)]
    mapped = [t_blocks[j][:, :-1][valid] for j in (0, 2, 4)]
    align = torch.stack([(1 - F.cosine_similarity(p, q, dim=-1)).mean() for p, q in zip(projected, mapped)]).mean()
    fdd = torch.stack(
        [
            (1 - F.cosine_similarity(projected[i + 1] - projected[i], mapped[i + 1] - mapped[i], dim=-1)).mean()
            for i in range(2)
        ]
    ).mean()
    expected = 0.3 * ce + 0.7 * T**2 * kd + 0.4 * align + 0.2 * fdd
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    # num_items_in_batch replaces the local count of valid tokens, for every term alike.
    halved = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(2 * int(valid.sum())))
    torch.testing.assert_close(halved, expected / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_cross_entropy_is_fused_with_kd_and_equals_trainers_own(tmp_path, padded_data, architecture):
    """By default the student runs without labels and CE comes from `distillation_loss`, in one pass with KD;
    loss, logged components and gradients equal Trainer's own CE path (Gemma's soft-capped logits included)."""
    extra = {"final_logit_softcapping": 5.0} if architecture.startswith("gemma") else {}
    teacher = build_tiny_model(architecture, seed=1, **extra)
    results = {}
    for fused in (True, False):
        student = build_tiny_model(architecture, seed=2, num_hidden_layers=2, **extra)
        args = make_args(tmp_path, alpha=0.4, beta=0.6, temperature=1.5, fused_cross_entropy=fused)
        trainer = DistillationTrainer(student, teacher, args, train_dataset=padded_data)
        assert trainer._fused_cross_entropy is fused  # a plain transformers causal LM without label smoothing
        received = []
        student.register_forward_pre_hook(
            lambda module, a, kw, received=received: received.append("labels" in kw), with_kwargs=True
        )
        batch = first_batch(trainer)
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(37))
        loss.backward()
        assert received == [not fused]
        metrics = {name: torch.stack(values).sum() for name, values in trainer.loss_terms.recorded["train"].items()}
        results[fused] = loss, metrics, [p.grad for p in student.parameters()]
        # Evaluation gets the model's outputs, with the distillation loss.
        trainer.model.eval()
        with torch.no_grad():
            eval_loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        assert outputs["loss"] is eval_loss and outputs.logits.shape[:2] == batch["input_ids"].shape
    (fused_loss, fused_metrics, fused_grads), (loss, metrics, grads) = results[True], results[False]
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-7)
    for name in ("ce", "kd", "num_tokens"):
        torch.testing.assert_close(fused_metrics[name], metrics[name], rtol=1e-6, atol=1e-7)
    for p, q in zip(fused_grads, grads):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_batches_with_shift_labels_keep_the_models_loss(tmp_path, padded_data):
    """Context parallelism hands the model pre-shifted (sharded) labels: such a batch is not fused."""
    student, teacher = narrow_student(), build_tiny_model(seed=1)
    trainer = DistillationTrainer(student, teacher, make_args(tmp_path), train_dataset=padded_data)
    batch = first_batch(trainer)
    shift_labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    shift_labels[:, 8:] = -100  # differs from shifting `labels`: the model's CE must see it
    received = []
    student.register_forward_pre_hook(lambda module, a, kw: received.append(kw.get("shift_labels")), with_kwargs=True)
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, {**batch, "shift_labels": shift_labels})
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert received[0] is shift_labels
    expected = F.cross_entropy(logits.flatten(0, 1), shift_labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(
        trainer.loss_terms.recorded["train"]["ce"][0] / trainer.loss_terms.recorded["train"]["num_tokens"][0],
        expected,
    )


def test_cross_entropy_stays_with_the_model_where_it_is_not_plain(tmp_path, padded_data):
    """Label smoothing, a compute_loss_func, a model subclass or a router auxiliary loss keep Trainer's CE path."""
    teacher = build_tiny_model(seed=1)

    class OwnLoss(type(narrow_student())):
        pass

    routed = narrow_student()
    routed.config.output_router_logits = True
    z_loss = narrow_student()
    z_loss.config.z_loss_coefficient = 0.1  # Bamba adds a z-loss to its CE
    cases = {
        "switched off": (narrow_student(), {"fused_cross_entropy": False}, {}),
        "z-loss": (z_loss, {}, {}),
        "label smoothing": (narrow_student(), {"label_smoothing_factor": 0.1}, {}),
        "compute_loss_func": (
            narrow_student(),
            {},
            {"compute_loss_func": lambda outputs, labels, **kw: outputs.logits.sum()},
        ),
        "subclass": (OwnLoss(narrow_student().config), {}, {}),
        "router loss": (routed, {}, {}),
        "no KD term": (narrow_student(), {"beta": 0.0, "gamma": 0.5, "layer_map": "uniform"}, {}),
    }
    for name, (student, overrides, kwargs) in cases.items():
        args = make_args(tmp_path, **{"alpha": 0.5, "beta": 0.5, **overrides})
        trainer = DistillationTrainer(student, teacher, args, train_dataset=padded_data, **kwargs)
        assert not trainer._fused_cross_entropy, name

    # With label smoothing, the logged CE is Trainer's smoothed CE.
    args = make_args(tmp_path, alpha=0.5, beta=0.5, label_smoothing_factor=0.1)
    trainer = DistillationTrainer(narrow_student(), teacher, args, train_dataset=padded_data)
    batch = first_batch(trainer)
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    valid = batch["labels"][:, 1:] != -100
    smoothed = F.cross_entropy(logits[:, :-1][valid], batch["labels"][:, 1:][valid], label_smoothing=0.1)
    metrics = trainer.loss_terms.recorded["train"]
    torch.testing.assert_close(metrics["ce"][0] / metrics["num_tokens"][0], smoothed, rtol=1e-5, atol=1e-6)


def test_a_model_with_its_own_unshifted_cross_entropy_keeps_it(tmp_path, padded_data):
    """BART's causal-LM decoder computes an unshifted `CrossEntropyLoss` in its forward, although its
    `loss_function` is the shared shifted one: fusing would silently change its CE, so it is not fused."""
    from transformers import BartConfig, BartForCausalLM

    config = BartConfig(
        vocab_size=320,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    student, teacher = BartForCausalLM(config), BartForCausalLM(config)
    args = make_args(tmp_path, alpha=1.0, beta=0.5)
    trainer = DistillationTrainer(student, teacher, args, train_dataset=padded_data)
    assert not trainer._fused_cross_entropy
    ids = torch.randint(0, 320, (2, 8))
    batch = {"input_ids": ids, "labels": ids.clone()}
    student.eval()
    with torch.no_grad():
        trainer.compute_loss(student, batch)
        logits = student(input_ids=ids).logits
    unshifted = F.cross_entropy(logits.flatten(0, 1), ids.flatten())  # what BartForCausalLM itself computes
    metrics = trainer.loss_terms.recorded["eval"]
    torch.testing.assert_close(metrics["ce"][0] / metrics["num_tokens"][0], unshifted)


def test_data_parallel_is_refused_with_how_to_launch(tmp_path, padded_data):
    """Several GPUs in one process make Trainer wrap the student in nn.DataParallel: refused before any work."""
    args = make_args(tmp_path)
    args._n_gpu = 2  # what TrainingArguments records on a 2-GPU machine without torchrun
    with pytest.raises(ValueError, match=r"DataParallel.*torchrun --nproc_per_node 2"):
        DistillationTrainer(narrow_student(), build_tiny_model(seed=1), args, train_dataset=padded_data)


def test_hidden_states_only_skip_the_teacher_logits(tmp_path, padded_data):
    from hf_recover.distill.alignment import hidden_alignment_loss

    teacher, student = build_tiny_model(seed=1), narrow_student()
    shapes = []
    teacher.lm_head.register_forward_hook(lambda module, args, output: shapes.append(output.shape))
    args = make_args(tmp_path, alpha=0.5, beta=0.0, gamma=0.5, layer_map="last")
    trainer = DistillationTrainer(student, teacher, args, train_dataset=padded_data)
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    assert shapes == [torch.Size([4, 1, 320])]  # one position, not (4, 24, 320)

    s = student(**batch, output_hidden_states=True)
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    align = hidden_alignment_loss(
        s.hidden_states, t.hidden_states, [3, 4, 5], batch["labels"], projectors=trainer.projectors
    )
    torch.testing.assert_close(loss, 0.5 * s.loss + 0.5 * align)


@pytest.mark.parametrize(
    ("divergence", "kwargs"),
    [("skew_forward_kl", {"skew_lambda": 0.3}), ("generalized_jsd", {"jsd_beta": 0.2}), ("total_variation", {})],
)
def test_divergence_choice_and_its_parameter_reach_the_loss(tmp_path, padded_data, divergence, kwargs):
    from hf_recover.base import losses

    teacher, student = build_tiny_model(seed=1), narrow_student()
    args = make_args(tmp_path, alpha=0.0, beta=1.0, temperature=1.0, divergence=divergence, **kwargs)
    trainer = DistillationTrainer(student, teacher, args, train_dataset=padded_data)
    batch = first_batch(trainer)
    own = {"skew_lambda": 0.3} if divergence.startswith("skew") else {"beta": 0.2} if "jsd" in divergence else {}
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        reference = getattr(losses, divergence)(
            student(**batch).logits, teacher(input_ids=batch["input_ids"]).logits, batch["labels"], **own
        )
        default = getattr(losses, divergence)(
            student(**batch).logits, teacher(input_ids=batch["input_ids"]).logits, batch["labels"]
        )
    torch.testing.assert_close(loss, reference)
    if own:
        assert not torch.allclose(loss, default)  # the configured parameter, not the function's default, was used


def test_without_distillation_terms_it_is_plain_trainer(tmp_path, padded_data):
    plain = Trainer(narrow_student(), make_args(tmp_path, "plain", cls=TrainingArguments), train_dataset=padded_data)
    plain.train()

    class NeverCalled(nn.Module):
        config = None

        def forward(self, *args, **kwargs):
            raise AssertionError("the teacher must not run when beta = gamma = delta = 0")

    args = make_args(tmp_path, "distill", alpha=1.0, beta=0.0, gamma=0.0, delta=0.0)
    distill = DistillationTrainer(narrow_student(), NeverCalled(), args, train_dataset=padded_data)
    distill.train()
    assert distill.teacher_model is None
    assert logged(distill, "loss") == logged(plain, "loss")
    assert logged(distill, "ce") == pytest.approx(logged(plain, "loss"), rel=1e-6)
    for (name, p), q in zip(plain.model.named_parameters(), distill.model.parameters()):
        assert torch.equal(p, q), name


def test_gradient_accumulation_2x2_equals_one_batch_of_4(tmp_path, padded_data):
    teacher = build_tiny_model(seed=1)

    def run(name, batch_size, accumulation):
        args = make_args(
            tmp_path,
            name,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=2,
            gamma=0.3,
            delta=0.3,
            layer_map="uniform",
        )
        trainer = DistillationTrainer(narrow_student(), teacher, args, train_dataset=padded_data)
        trainer.train()
        return trainer

    one, accumulated = run("one", 4, 1), run("accumulated", 2, 2)
    for key in ("loss", "ce", "kd", "align", "fdd"):
        assert logged(accumulated, key) == pytest.approx(logged(one, key), rel=1e-5), key
    for p, q in zip(one.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(one.projectors.parameters(), accumulated.projectors.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, torch.zeros_like(p))


def test_resume_reproduces_an_uninterrupted_run_projectors_included(tmp_path, padded_data):
    teacher = build_tiny_model(seed=1)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, gamma=0.5, delta=0.2, layer_map="uniform")
    full = DistillationTrainer(
        narrow_student(), teacher, make_args(tmp_path, "full", **common), train_dataset=padded_data
    )
    initial_projectors = copy.deepcopy(full.projectors)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / PROJECTORS_NAME).is_file()

    resumed = DistillationTrainer(
        narrow_student(seed=5), teacher, make_args(tmp_path, "resumed", **common), train_dataset=padded_data
    )
    for param in resumed.projectors.parameters():  # the checkpoint must overwrite these
        nn.init.normal_(param)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    for key in ("loss", "kd", "align", "fdd"):
        assert len(logged(full, key)) == len(logged(resumed, key)) == 4  # the resumed state holds steps 1-2
        assert logged(resumed, key)[2:] == pytest.approx(logged(full, key)[2:], rel=1e-5), key
    for p, q, p0 in zip(
        full.projectors.parameters(), resumed.projectors.parameters(), initial_projectors.parameters()
    ):
        torch.testing.assert_close(q, p)
        assert not torch.allclose(p, p0)  # the projectors did train
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p)


# -- the teacher, saving, the kept layer map ------------------------------------------------------------------


def test_teacher_frozen_unchanged_and_not_saved_kept_map_and_pruned_config(tmp_path, padded_data):
    teacher = build_tiny_model(seed=1)
    student, pruned = depth_prune(teacher, [0, 2, 3, 5])
    snapshot = copy.deepcopy(teacher.state_dict())
    args = make_args(tmp_path, gamma=0.5, delta=0.5, save_strategy="steps", save_steps=2, max_steps=2)
    trainer = DistillationTrainer(student, teacher, args, train_dataset=padded_data)
    assert trainer.pruned_config is pruned and trainer.layer_map == [0, 2, 3, 5] and trainer.projectors is None
    trainer.train()

    assert not trainer.teacher_model.training
    for name, param in teacher.named_parameters():
        assert not param.requires_grad and param.grad is None, name
        assert torch.equal(param, snapshot[name]), name
    assert not any(
        p is q for p in teacher.parameters() for group in trainer.optimizer.param_groups for q in group["params"]
    )

    output = tmp_path / "out"
    trainer.save_model()
    for folder in (output, output / "checkpoint-2"):
        assert PrunedConfig.from_pretrained(folder).kept_layer_indices == [0, 2, 3, 5]
        saved = load_file(folder / "model.safetensors")
        assert set(saved) <= set(student.state_dict()) and len(saved) > 0
        assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    assert reloaded.config.num_hidden_layers == 4


def test_teacher_from_a_path_and_plain_training_arguments(tmp_path, padded_data):
    build_tiny_model(seed=1).save_pretrained(tmp_path / "teacher")
    args = make_args(tmp_path, teacher_dtype="bfloat16")
    trainer = DistillationTrainer(narrow_student(), str(tmp_path / "teacher"), args, train_dataset=padded_data)
    teacher = trainer.teacher_model
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    trainer.train()
    assert all(torch.isfinite(torch.tensor(value)) for value in logged(trainer, "kd"))

    upgraded = DistillationTrainer(
        narrow_student(),
        build_tiny_model(seed=1),
        make_args(tmp_path, "plain", cls=TrainingArguments, learning_rate=3e-4),
        train_dataset=padded_data,
    )
    assert isinstance(upgraded.args, DistillationConfig)
    assert upgraded.args.learning_rate == 3e-4 and upgraded.args.beta == 0.5


def test_kd_loss_falls(tmp_path, padded_data):
    teacher = build_tiny_model(seed=1, tie_word_embeddings=False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)  # a confident teacher: random tiny models are near-uniform
    args = make_args(tmp_path, alpha=0.0, beta=1.0, temperature=1.0, max_steps=30, logging_steps=5, learning_rate=1e-2)
    trainer = DistillationTrainer(narrow_student(), teacher, args, train_dataset=padded_data)
    trainer.train()
    kd = logged(trainer, "kd")
    assert len(kd) == 6 and all(later < earlier for earlier, later in zip(kd, kd[1:])), kd
    assert kd[-1] < 0.8 * kd[0], kd


def test_eval_components_logged_with_the_eval_prefix(tmp_path, padded_data):
    eval_data = padded_data.select(range(4))  # one eval batch: eval_loss is then exactly the compound of the means
    args = make_args(tmp_path, alpha=0.4, beta=0.6, temperature=2.0, gamma=0.5, layer_map="last")
    trainer = DistillationTrainer(narrow_student(), build_tiny_model(seed=1), args, eval_dataset=eval_data)
    metrics = trainer.evaluate()
    expected = 0.4 * metrics["eval_ce"] + 0.6 * 4 * metrics["eval_kd"] + 0.5 * metrics["eval_align"]
    # The objective is reported as eval_distillation_loss; eval_loss is the student's own LM loss (its CE).
    assert metrics["eval_distillation_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_ce"], rel=1e-6)
    assert "eval_fdd" not in metrics and "ce" not in metrics
    assert trainer.state.log_history[-1]["eval_kd"] == metrics["eval_kd"]
    assert {"val_ce", "val_kd", "val_align", "val_distillation_loss"} <= set(trainer.evaluate(metric_key_prefix="val"))
    # The switch restores the objective as eval_loss.
    args = make_args(tmp_path, alpha=0.4, beta=0.6, temperature=2.0, gamma=0.5, layer_map="last")
    args.eval_objective_as_loss = True
    trainer = DistillationTrainer(narrow_student(), build_tiny_model(seed=1), args, eval_dataset=eval_data)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_distillation_loss"], rel=1e-6)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_eval_and_test_loss_are_the_students_own_as_plain_trainer_reports(tmp_path, padded_data):
    """`exp(eval_loss)` is the student's perplexity: equal to plain Trainer's eval_loss on the same model and data,
    and `predict()` reports test_loss the same way, with the components beside it."""
    from transformers import Trainer

    eval_data = padded_data.select(range(8))
    student = narrow_student()
    plain = Trainer(copy.deepcopy(student), make_args(tmp_path, "plain", alpha=1.0, beta=0.0), eval_dataset=eval_data)
    want = plain.evaluate()["eval_loss"]
    args = make_args(tmp_path, alpha=0.5, beta=0.5)
    trainer = DistillationTrainer(student, build_tiny_model(seed=1), args, eval_dataset=eval_data)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-5)
    prediction = trainer.predict(eval_data)
    assert prediction.metrics["test_loss"] == pytest.approx(want, rel=1e-5)
    assert {"test_ce", "test_kd", "test_distillation_loss"} <= set(prediction.metrics)
    assert not trainer.loss_terms.recorded["eval"]  # nothing left over for the next evaluation


@pytest.mark.parametrize("metric", ["eval_ce", "kd", "eval_distillation_loss", "eval_loss"])
def test_every_component_is_lower_is_better(tmp_path, metric):
    args = make_args(tmp_path, metric_for_best_model=metric)
    assert args.greater_is_better is False
    assert make_args(tmp_path, metric_for_best_model=metric, greater_is_better=True).greater_is_better is True


def test_save_projectors_only_when_asked(tmp_path, padded_data):
    teacher = build_tiny_model(seed=1)
    for flag in (False, True):
        args = make_args(tmp_path, f"out-{flag}", gamma=1.0, layer_map="uniform", save_projectors=flag)
        trainer = DistillationTrainer(narrow_student(), teacher, args, train_dataset=padded_data)
        trainer.save_model()
        path = tmp_path / f"out-{flag}" / PROJECTORS_NAME
        assert path.is_file() == flag
        if flag:
            for name, tensor in trainer.projectors.state_dict().items():
                torch.testing.assert_close(load_file(path)[name], tensor)


def test_bf16_mixed_precision_on_cpu(tmp_path, padded_data):
    args = make_args(tmp_path, bf16=True, gamma=0.5, delta=0.5, layer_map="uniform", max_steps=2)
    trainer = DistillationTrainer(narrow_student(), build_tiny_model(seed=1), args, train_dataset=padded_data)
    trainer.train()
    for key in ("loss", "kd", "align", "fdd"):
        assert all(torch.isfinite(torch.tensor(value)) for value in logged(trainer, key)), key


# -- PEFT ------------------------------------------------------------------------------------------------------


def test_lora_student_trains_and_checkpoints_its_adapter(tmp_path, padded_data):
    from peft import LoraConfig, get_peft_model

    teacher = build_tiny_model(seed=1)
    student, _ = depth_prune(teacher, [0, 2, 4])
    base = copy.deepcopy(student.state_dict())
    lora = get_peft_model(student, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    args = make_args(tmp_path, gamma=0.5, max_steps=2, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    trainer = DistillationTrainer(lora, teacher, args, train_dataset=padded_data)
    assert trainer.layer_map == [0, 2, 4]  # the kept map, found through the PeftModel
    adapters_before = {n: p.clone() for n, p in lora.named_parameters() if "lora_B" in n}
    assert len(adapters_before) == 6
    trainer.train()

    assert all(not torch.equal(p, adapters_before[n]) for n, p in lora.named_parameters() if "lora_B" in n)
    frozen = [(n.replace("base_layer.", ""), p) for n, p in student.named_parameters() if "lora" not in n]
    assert len(frozen) == len(base) - 1  # all but the tied lm_head
    assert all(torch.equal(p, base[n]) for n, p in frozen)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert (checkpoint / PRUNED_CONFIG_NAME).is_file()


def test_lora_adapters_merge_at_the_end(tmp_path, padded_data):
    from peft import LoraConfig, PeftModel, get_peft_model

    teacher = build_tiny_model(seed=1)
    student, _ = depth_prune(teacher, [0, 1, 3, 5])
    ids = torch.tensor([padded_data[0]["input_ids"]])
    with torch.no_grad():
        base_logits = student(input_ids=ids).logits
    lora = get_peft_model(student, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))

    class Snapshot(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            assert isinstance(model, PeftModel)
            with torch.no_grad():
                self.logits = model(input_ids=ids).logits

    snapshot = Snapshot()
    args = make_args(tmp_path, gamma=0.5, merge_adapters=True, learning_rate=1e-2)
    trainer = DistillationTrainer(lora, teacher, args, train_dataset=padded_data, callbacks=[snapshot])
    trainer.train()

    merged = trainer.model
    assert not isinstance(merged, PeftModel) and trainer.model_wrapped is merged
    assert not torch.allclose(snapshot.logits, base_logits, atol=1e-4)  # the adapters changed the model
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, snapshot.logits)
    trainer.save_model()
    output = tmp_path / "out"
    assert (output / "model.safetensors").is_file() and not (output / "adapter_model.safetensors").exists()
    assert PrunedConfig.from_pretrained(output).kept_layer_indices == [0, 1, 3, 5]
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, snapshot.logits)


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_input(tmp_path, padded_data):
    teacher = build_tiny_model(seed=1)
    with pytest.raises(ValueError, match="teacher_model is required"):
        DistillationTrainer(narrow_student(), None, make_args(tmp_path), train_dataset=padded_data)
    with pytest.raises(ValueError, match="merge_adapters"):
        DistillationTrainer(narrow_student(), teacher, make_args(tmp_path, merge_adapters=True))
    with pytest.raises(ValueError, match="uniform"):  # layer_map='kept' (the default) without a PrunedConfig
        DistillationTrainer(narrow_student(), teacher, make_args(tmp_path, gamma=0.5))
    with pytest.raises(ValueError, match="projector"):
        DistillationTrainer(
            narrow_student(), teacher, make_args(tmp_path, gamma=0.5, layer_map="last", projector="none")
        )
    with pytest.raises(ValueError, match=r"valid indices are 0\.\.5"):
        DistillationTrainer(narrow_student(), teacher, make_args(tmp_path, delta=0.5, layer_map="0,2,9"))
    trainer = DistillationTrainer(narrow_student(), teacher, make_args(tmp_path))
    batch = {"input_ids": torch.tensor([padded_data[0]["input_ids"]])}
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(trainer.model, batch)


def test_a_tokenizer_mismatch_fails_when_the_trainer_is_built(tmp_path, padded_data):
    teacher = build_tiny_model(seed=1, vocab_size=1000)  # 680 extra rows: more than padding (at most 256 here)
    with pytest.raises(ValueError, match="320 and teacher vocabulary size 1000"):
        DistillationTrainer(build_tiny_model(), teacher, make_args(tmp_path), train_dataset=padded_data)


def test_predict_batches_do_not_leak_into_the_next_evaluation(tmp_path, padded_data):
    teacher, student = build_tiny_model(seed=1), build_tiny_model(seed=2)
    trainer = DistillationTrainer(student, teacher, make_args(tmp_path), train_dataset=padded_data)
    alone = trainer.evaluate(padded_data.select(range(2)))
    trainer.predict(padded_data.select(range(2, 8)))
    after_predict = trainer.evaluate(padded_data.select(range(2)))
    assert after_predict["eval_kd"] == pytest.approx(alone["eval_kd"], rel=1e-6)


def test_a_student_path_with_uneven_mlp_sizes_loads(tmp_path, padded_data):
    from hf_recover import prune_width

    student, pruned = prune_width(build_tiny_model(seed=2), pruning_ratio=0.5, layers=[0, 2])
    student.save_pretrained(tmp_path / "student")
    pruned.save_pretrained(tmp_path / "student")
    trainer = DistillationTrainer(str(tmp_path / "student"), build_tiny_model(seed=1), make_args(tmp_path))
    sizes = [layer.mlp.gate_proj.out_features for layer in trainer.model.model.layers]
    assert sizes == [32, 64, 32, 64, 64, 64]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"divergence": "skew_reverse_kl", "skew_lambda": 1.0}, "identically 0"),
    ],
)
def test_degenerate_recipes_are_rejected(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)


def test_run_recovery_validates_the_recipe_before_evaluating(tmp_path, padded_data, monkeypatch):
    import hf_recover.recovery as recovery

    monkeypatch.setattr(recovery, "evaluate_splits", lambda *a, **k: pytest.fail("evaluated before validating"))
    teacher, student = build_tiny_model(seed=1), build_tiny_model(seed=2, num_hidden_layers=3)
    args = make_args(tmp_path, gamma=0.5, layer_map="0,1,99")
    with pytest.raises(ValueError, match="99"):
        recovery.run_recovery(
            teacher=teacher, student=student, tokenizer=None, args=args, train_dataset=padded_data,
            eval_splits={"validation": padded_data},
        )  # fmt: skip


def test_run_recovery_counts_the_real_tokens_trained_on(tmp_path, padded_data, tiny_tokenizer):
    import hf_recover.recovery as recovery

    teacher, student = build_tiny_model(seed=1), build_tiny_model(seed=2, num_hidden_layers=3)
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=len(padded_data))  # one batch: every row
    _, result = recovery.run_recovery(
        teacher=teacher, student=student, tokenizer=tiny_tokenizer, args=args, train_dataset=padded_data,
        eval_splits={"validation": padded_data.select(range(2))}, save=False,
    )  # fmt: skip
    real = [sum(mask) for mask in padded_data["attention_mask"]]
    assert len(set(real)) > 1  # padded rows: counting every position would give more
    assert result.train_tokens == sum(real)


@pytest.mark.parametrize("metric", ["eval_ce", "eval_kd", "eval_align", "eval_distillation_loss"])
def test_load_best_model_at_end_keeps_the_lowest(tmp_path, padded_data, metric):
    args = make_args(
        tmp_path,
        alpha=0.5,
        beta=0.5,
        gamma=0.5,
        layer_map="last",
        learning_rate=5e-2,  # large steps: the metrics move, so that the best step is not simply the last one
        max_steps=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
    )
    trainer = DistillationTrainer(
        narrow_student(), build_tiny_model(seed=1), args, train_dataset=padded_data, eval_dataset=padded_data
    )
    trainer.train()
    history = {log["step"]: log[metric] for log in trainer.state.log_history if metric in log}
    assert len(history) == 4, history  # evaluated at every step
    best_step = min(history, key=history.get)
    assert trainer.state.best_metric == pytest.approx(history[best_step])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, padded_data, tiny_tokenizer):
    """Same vocabulary size, other tokens: a wrong target the vocabulary-size check cannot see."""
    from conftest import build_tiny_tokenizer

    other = build_tiny_tokenizer([text[::-1] for text in TINY_TEXTS])
    assert len(other) == len(tiny_tokenizer)
    first = min(i for t, i in tiny_tokenizer.get_vocab().items() if other.convert_ids_to_tokens(i) != t)
    args = make_args(tmp_path)
    kwargs = dict(train_dataset=padded_data, processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match=rf"id {first} is .* for the student but .* for the teacher"):
        DistillationTrainer(narrow_student(), build_tiny_model(seed=1), args, teacher_tokenizer=other, **kwargs)
    # A teacher given as a folder brings its own tokenizer: checked before its weights are loaded.
    folder = tmp_path / "teacher"
    build_tiny_model(seed=1).save_pretrained(folder)
    other.save_pretrained(folder)
    with pytest.raises(ValueError, match="must share a tokenizer"):
        DistillationTrainer(narrow_student(), str(folder), args, **kwargs)
    # The same tokenizer, or one with an extra special token, is accepted.
    tiny_tokenizer.save_pretrained(folder)
    DistillationTrainer(narrow_student(), str(folder), args, **kwargs)
    extended = build_tiny_tokenizer()
    extended.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    DistillationTrainer(narrow_student(), build_tiny_model(seed=1), args, teacher_tokenizer=extended, **kwargs)


@pytest.mark.parametrize("bf16, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_run_recovery_evaluates_in_the_type_it_trains_in_and_says_which(
    tmp_path, padded_data, tiny_tokenizer, monkeypatch, bf16, dtype
):
    import hf_recover.recovery as recovery

    seen, evaluate = [], recovery.evaluate_splits

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(recovery, "evaluate_splits", spy)
    teacher, student = build_tiny_model(seed=1), build_tiny_model(seed=2, num_hidden_layers=3)
    _, result = recovery.run_recovery(
        teacher=teacher, student=student, tokenizer=tiny_tokenizer, args=make_args(tmp_path, max_steps=1, bf16=bf16),
        train_dataset=padded_data, eval_splits={"validation": padded_data.select(range(2))}, save=False,
    )  # fmt: skip
    assert seen == [dtype, dtype]  # before and after
    assert result.precision == str(dtype).removeprefix("torch.")
    assert f"computed in {result.precision}" in result.to_markdown()
    assert list(result.phase_seconds) == ["evaluation before", "training", "evaluation after"]
    assert all(seconds >= 0 for seconds in result.phase_seconds.values())
    assert sum(result.phase_seconds.values()) <= result.wall_time
