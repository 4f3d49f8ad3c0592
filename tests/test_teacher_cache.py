"""Cached top-k teacher distributions: the builder, the bucketed KD term, the trainer and the CLI, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXTS, build_tiny_model, make_args

from hf_recover.base.constants import IGNORE_INDEX
from hf_recover.base.losses import DIVERGENCES, TopKTeacher, distillation_loss, forward_kl, teacher_top_k
from hf_recover.base.losses.topk import sample_tail, tail_share
from hf_recover.distill.shards import SHARDS_DIR
from hf_recover.distill.teacher_cache import (
    METADATA_NAME,
    SAMPLE_IDS_COLUMN,
    SAMPLE_LOGPROBS_COLUMN,
    TOP_IDS_COLUMN,
    TOP_LOGPROBS_COLUMN,
    cache_teacher_outputs,
    load_teacher_cache,
    sample_counts_column,
    tail_column,
)

WORKER = Path(__file__).parent / "cache_worker.py"


@pytest.fixture
def prepared(tiny_tokenizer):
    from datasets import Dataset

    from hf_recover import prepare_recovery_dataset

    texts = [text[: 12 + 7 * i] for i, text in enumerate(TINY_TEXTS * 2)]
    return prepare_recovery_dataset(Dataset.from_dict({"text": texts}), tiny_tokenizer, max_length=24, packing=False)


def _top_k_teacher(teacher_logits: torch.Tensor, k: int, temperature: float) -> TopKTeacher:
    batch, length, vocab = teacher_logits.shape
    ids, logprobs, tails = teacher_top_k(teacher_logits.reshape(-1, vocab), k, (temperature,))
    return TopKTeacher(ids.view(batch, length, k), logprobs.view(batch, length, k), tails[:, 0].view(batch, length))


def _random_case(batch=2, length=7, vocab=13, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=generator) * 2
    teacher = torch.randn(batch, length, vocab, generator=generator) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, 3] = labels[-1, 0] = IGNORE_INDEX
    return student, teacher, labels


# -- the bucketed KD term -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_top_k_equal_to_vocabulary_is_online_kd(name, temperature):
    student, teacher, labels = _random_case()
    cached = _top_k_teacher(teacher, teacher.size(-1), temperature)
    dense_input, cached_input = student.clone().requires_grad_(), student.clone().requires_grad_()
    dense = DIVERGENCES[name](dense_input, teacher, labels, temperature=temperature, chunk_size=5)
    sparse = DIVERGENCES[name](cached_input, cached, labels, temperature=temperature, chunk_size=3)
    dense.backward()
    sparse.backward()
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached_input.grad, dense_input.grad, rtol=1e-5, atol=1e-7)


def _naive_bucketed(p: torch.Tensor, q: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket two (n, V) distributions by hand: the top-k columns, then the sum of the others."""
    top_p, top_q = p.gather(1, ids), q.gather(1, ids)
    return torch.cat([top_p, 1 - top_p.sum(1, keepdim=True)], 1), torch.cat([top_q, 1 - top_q.sum(1, keepdim=True)], 1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_small_top_k_obeys_the_documented_gaps(temperature):
    """KL − KL_bucketed = p(tail)·KL(p(·|tail) ‖ q(·|tail)) (and reverse), 0 ≤ TV − TV_bucketed ≤ min tail mass."""
    student, teacher, _ = _random_case(batch=1, length=6, vocab=17, seed=3)
    labels = torch.zeros(1, 6, dtype=torch.long)  # every position but the last is scored
    k = 4
    cached = _top_k_teacher(teacher.double(), k, temperature)
    cached = TopKTeacher(cached.token_ids, cached.logprobs.double(), cached.tail_logmass.double())
    p = torch.softmax(teacher.double()[0, :5] / temperature, -1)
    q = torch.softmax(student.double()[0, :5] / temperature, -1)
    ids = cached.token_ids[0, :5]
    tail = torch.ones_like(p, dtype=torch.bool).scatter_(1, ids, False)
    p_tail, q_tail = (torch.where(tail, x, 0).sum(1) for x in (p, q))
    p_cond, q_cond = torch.where(tail, p, 0) / p_tail[:, None], torch.where(tail, q, 0) / q_tail[:, None]
    kl_tail = torch.where(tail, p_cond * (p_cond.log() - q_cond.log()), 0).sum(1)
    reverse_kl_tail = torch.where(tail, q_cond * (q_cond.log() - p_cond.log()), 0).sum(1)
    run = dict(temperature=temperature)
    student = student.double()
    gap = DIVERGENCES["forward_kl"](student, teacher.double(), labels, **run) - DIVERGENCES["forward_kl"](
        student, cached, labels, **run
    )
    torch.testing.assert_close(gap, (p_tail * kl_tail).mean())
    gap = DIVERGENCES["reverse_kl"](student, teacher.double(), labels, **run) - DIVERGENCES["reverse_kl"](
        student, cached, labels, **run
    )
    torch.testing.assert_close(gap, (q_tail * reverse_kl_tail).mean())
    tv_gap = DIVERGENCES["total_variation"](student, teacher.double(), labels, **run) - DIVERGENCES["total_variation"](
        student, cached, labels, **run
    )
    assert 0 < tv_gap <= torch.minimum(p_tail, q_tail).mean() + 1e-12
    # The bucketed value itself, against the naive bucketing of both distributions.
    bucket_p, bucket_q = _naive_bucketed(p, q, ids)
    expected = (bucket_p * (bucket_p.log() - bucket_q.log())).sum(1).mean()
    torch.testing.assert_close(DIVERGENCES["forward_kl"](student, cached, labels, **run), expected)
    for name in DIVERGENCES:  # data-processing inequality: never above the full-vocabulary value
        assert (
            DIVERGENCES[name](student, cached, labels, **run)
            <= DIVERGENCES[name](student, teacher.double(), labels, **run) + 1e-12
        ), name


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_bucketed_gradient_matches_autograd_of_the_naive_bucketing(name):
    student, teacher, labels = _random_case(batch=1, length=5, vocab=11, seed=5)
    cached = _top_k_teacher(teacher.double(), 3, 2.0)
    cached = TopKTeacher(cached.token_ids, cached.logprobs.double(), cached.tail_logmass.double())
    student = student.double().requires_grad_()
    torch.autograd.gradcheck(
        lambda s: DIVERGENCES[name](s, cached, labels, temperature=2.0, chunk_size=2), (student,), atol=1e-6
    )


def test_fused_ce_and_cached_kd_equal_their_sum():
    student, teacher, labels = _random_case()
    cached = _top_k_teacher(teacher, 5, 2.0)
    fused_input, split_input = student.clone().requires_grad_(), student.clone().requires_grad_()
    result = distillation_loss(fused_input, cached, labels, ce_weight=0.5, kd_weight=2.0, temperature=2.0)
    ce = F.cross_entropy(split_input[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    kd = DIVERGENCES["forward_kl"](split_input, cached, labels, temperature=2.0)
    (0.5 * ce + 2.0 * kd).backward()
    result.loss.backward()
    torch.testing.assert_close(result.loss, 0.5 * ce + 2.0 * kd)
    torch.testing.assert_close(fused_input.grad, split_input.grad)


def test_a_student_lm_head_in_blocks_of_chunks_against_a_cache(monkeypatch):
    """The fused lm_head's path with a cached teacher: the student's logits computed per block of 17 positions, the
    loss walked in chunks of 5, equal to the loss and gradients through the student's whole logits."""
    from hf_recover.base.losses import LMHeadInputs, chunking

    monkeypatch.setattr(chunking, "CPU_CHUNK_ELEMENTS", 5 * 13)
    monkeypatch.setattr(chunking, "HEAD_BLOCK_TOKENS", 17)
    _, teacher, labels = _random_case(batch=3, length=19)
    cached = _top_k_teacher(teacher, 4, 2.0)
    generator = torch.Generator().manual_seed(1)
    states, weight = torch.randn(3, 19, 6, generator=generator), torch.randn(13, 6, generator=generator)
    leaves = [t.clone().requires_grad_() for t in (states, weight)]
    head_leaves = [t.clone().requires_grad_() for t in (states, weight)]
    kwargs = dict(ce_weight=0.5, kd_weight=2.0, temperature=2.0)
    want = distillation_loss(F.linear(*leaves), cached, labels, chunk_size=57, **kwargs)  # one chunk, no blocks
    got = distillation_loss(LMHeadInputs(*head_leaves), cached, labels, **kwargs)
    want.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss)
    for head_leaf, leaf in zip(head_leaves, leaves):
        torch.testing.assert_close(head_leaf.grad, leaf.grad)


# -- sampled tails ------------------------------------------------------------------------------------------------


def test_sample_tail_draws_distinct_tail_tokens_with_their_counts():
    logits = torch.randn(50, 17, generator=torch.Generator().manual_seed(3)) * 2
    top_ids = logits.topk(4, dim=-1).indices
    generator = torch.Generator().manual_seed(0)
    ids, logprobs, counts = sample_tail(logits, top_ids, 6, 2.0, generator, chunk_elements=17 * 7)
    assert ids.shape == logprobs.shape == counts.shape == (50, 6)
    assert counts.sum(-1).eq(6).all() and counts.ge(0).all()
    for row, top in zip(ids.tolist(), top_ids.tolist()):
        assert len(set(row)) == 6 and not set(row) & set(top)  # distinct, none of the top-k
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(1, ids))
    # Drawn tokens come first (by count), then the most likely undrawn ones.
    assert (counts[:, :-1] >= counts[:, 1:]).all()
    assert ids.equal(sample_tail(logits, top_ids, 6, 2.0, torch.Generator().manual_seed(0))[0])  # seeded


def _forward_kl_gradient(teacher, student, labels, temperature):
    student = student.detach().clone().requires_grad_()
    forward_kl(student, teacher, labels, temperature=temperature).backward()
    return student.grad[0].sum(0)  # every row is the same position: the gradient of the mean


@pytest.mark.parametrize("temperature", [2.0, 1.0], ids=["at-the-sampling-T", "reweighted-to-T1"])
def test_tail_samples_make_the_forward_kl_gradient_unbiased(temperature):
    """One position repeated 20,000 times, each with its own draws of 4 tail tokens (drawn at T = 2): the mean
    gradient is the full-vocabulary one, where the one-bucket tail's is not."""
    generator = torch.Generator().manual_seed(0)
    vocab, k, samples, rows = 23, 3, 4, 20000
    teacher = (torch.randn(vocab, generator=generator) * 2).expand(1, rows, vocab).contiguous()
    student = (torch.randn(vocab, generator=generator) * 2).expand(1, rows, vocab).contiguous()
    labels = torch.zeros(1, rows, dtype=torch.long)
    flat = teacher.reshape(-1, vocab)
    ids, logprobs, tails = teacher_top_k(flat, k, (temperature,))
    sample_ids, sample_logprobs, counts = sample_tail(flat, ids, samples, 2.0, generator)
    share = tail_share(counts, sample_logprobs, temperature, 2.0)
    shaped = [t.view(1, rows, -1) for t in (ids, logprobs)]
    bucket = TopKTeacher(*shaped, tails[:, 0].view(1, rows))
    sampled = TopKTeacher(*shaped, tails[:, 0].view(1, rows), sample_ids.view(1, rows, -1), share.view(1, rows, -1))
    full = _forward_kl_gradient(teacher, student, labels, temperature)
    scale = full.abs().max()
    assert (_forward_kl_gradient(bucket, student, labels, temperature) - full).abs().max() > 0.2 * scale
    assert (_forward_kl_gradient(sampled, student, labels, temperature) - full).abs().max() < 0.03 * scale


def test_tail_share_splits_the_tail_by_counts_and_importance_weights():
    counts = torch.tensor([[3, 1, 0]])
    logprobs = torch.tensor([[-2.0, -4.0, -5.0]])
    torch.testing.assert_close(tail_share(counts, logprobs, 2.0, 2.0).exp(), torch.tensor([[0.75, 0.25, 0.0]]))
    weights = torch.tensor([3.0, 1.0]) * torch.tensor([-1.0, -2.0]).exp()  # counts · p^(1/1 − 1/2)
    expected = torch.cat([weights / weights.sum(), torch.zeros(1)])
    torch.testing.assert_close(tail_share(counts, logprobs, 1.0, 2.0).exp()[0], expected)


def test_top_k_teacher_shapes_and_ids_are_checked():
    student, teacher, labels = _random_case()
    cached = _top_k_teacher(teacher, 4, 1.0)
    with pytest.raises(ValueError, match="not aligned"):
        DIVERGENCES["forward_kl"](student[:, :-1], cached, labels[:, :-1])
    bad_ids = TopKTeacher(cached.token_ids + 20, *cached[1:])
    with pytest.raises(ValueError, match="outside the student's vocabulary"):
        DIVERGENCES["forward_kl"](student, bad_ids, labels)


# -- building and loading ---------------------------------------------------------------------------------------


def test_cache_round_trip(tmp_path, prepared, tiny_tokenizer):
    teacher = build_tiny_model(seed=1)
    out = cache_teacher_outputs(
        teacher, prepared, tmp_path / "cache", top_k=5, batch_size=3, shard_size=4, tokenizer=tiny_tokenizer
    )
    cache = load_teacher_cache(
        out, tokenizer=tiny_tokenizer, teacher=teacher, dataset=prepared, max_length=24, temperature=2.0
    )
    metadata = json.loads((out / METADATA_NAME).read_text())
    assert metadata["top_k"] == 5 and metadata["max_length"] == 24 and metadata["packing"] is False
    assert metadata["num_shards"] == 5 == len(list((out / SHARDS_DIR).iterdir()))
    assert (out / "README.md").read_text().count("Teacher cache of") == 1
    rows = cache.dataset
    assert len(rows) == len(prepared)
    assert rows[7]["input_ids"].tolist() == prepared[7]["input_ids"]
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor(prepared[7:9]["input_ids"])).logits.float()
    logp = torch.log_softmax(logits, -1)
    expected_logp, expected_ids = logp.topk(5, -1)
    assert torch.equal(rows[7:9][TOP_IDS_COLUMN], expected_ids)
    torch.testing.assert_close(rows[7:9][TOP_LOGPROBS_COLUMN].float(), expected_logp, atol=4e-3, rtol=1e-3)
    tail = logp.scatter(-1, expected_ids, float("-inf"))
    torch.testing.assert_close(rows[7:9][tail_column(1.0)], tail.logsumexp(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[7:9][tail_column(2)], (tail / 2).logsumexp(-1), atol=1e-5, rtol=1e-5)
    assert metadata["tail_samples"] == 16  # the default
    bucket = cache_teacher_outputs(
        teacher, prepared, tmp_path / "bucket", top_k=5, tail_samples=0, shard_size=4, show_progress=False
    )
    bucket_bytes = json.loads((bucket / METADATA_NAME).read_text())["bytes_per_token"]
    assert bucket_bytes < 5 * 4 + 100  # uint16 ids + float16 log-probs + tails + inputs
    # each sample: a uint16 id, a float16 log-prob, a uint8 count (and Arrow's per-row offsets)
    assert 16 * 5 <= metadata["bytes_per_token"] - bucket_bytes < 16 * 5 * 1.5


def test_cache_with_tail_samples_round_trip_and_training(tmp_path, prepared, tiny_tokenizer):
    """Tail samples are stored with the top-k (ids outside it, counts summing to the draws, at the largest cached
    T), and a trainer reads them: its KD term is the one computed by hand from the stored columns."""
    from hf_recover import DistillationTrainer

    teacher = build_tiny_model(seed=1)
    out = cache_teacher_outputs(
        teacher, prepared, tmp_path / "cache", top_k=5, tail_samples=7, shard_size=8, show_progress=False
    )
    metadata = json.loads((out / METADATA_NAME).read_text())
    assert metadata["tail_samples"] == 7 and metadata["sample_temperature"] == 2.0
    assert "Tail samples: 7" in (out / "README.md").read_text()
    rows = load_teacher_cache(out).dataset[:]
    counts = rows[sample_counts_column(2.0)]
    assert rows[SAMPLE_IDS_COLUMN].shape == counts.shape == (len(prepared), 24, 7)
    assert counts.sum(-1).eq(7).all()
    overlap = rows[SAMPLE_IDS_COLUMN][..., :, None] == rows[TOP_IDS_COLUMN][..., None, :]
    assert not overlap.any()
    with torch.no_grad():
        logits = teacher(input_ids=rows["input_ids"][:2], attention_mask=rows["attention_mask"][:2]).logits
    logp = torch.log_softmax(logits.float(), -1)
    expected = logp.gather(-1, rows[SAMPLE_IDS_COLUMN][:2].long())
    torch.testing.assert_close(rows[SAMPLE_LOGPROBS_COLUMN][:2].float(), expected, atol=4e-3, rtol=1e-3)

    args = make_args(tmp_path, "train", temperature=1.0, alpha=0.5, beta=0.5, max_steps=1)
    trainer = DistillationTrainer(_student(), None, args, teacher_cache=out)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert SAMPLE_IDS_COLUMN in batch
    loss = trainer.compute_loss(trainer.model, dict(batch))
    share = tail_share(batch[sample_counts_column(2.0)], batch[SAMPLE_LOGPROBS_COLUMN].float(), 1.0, 2.0)
    cached = TopKTeacher(
        batch[TOP_IDS_COLUMN].long(), batch[TOP_LOGPROBS_COLUMN], batch[tail_column(1.0)],
        batch[SAMPLE_IDS_COLUMN].long(), share,
    )  # fmt: skip
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = distillation_loss(logits, cached, batch["labels"], ce_weight=0.5, kd_weight=0.5, temperature=1.0)
    torch.testing.assert_close(loss.detach(), expected.loss, rtol=1e-5, atol=1e-6)
    bucket_only = distillation_loss(
        logits, TopKTeacher(*cached[:3]), batch["labels"], ce_weight=0.5, kd_weight=0.5, temperature=1.0
    )
    assert not torch.isclose(bucket_only.loss, expected.loss)  # the samples are used


def test_interrupted_build_resumes_without_recomputing_finished_shards(tmp_path, prepared, tiny_tokenizer):
    teacher = build_tiny_model(seed=1)
    forward = teacher.forward
    calls = []

    def failing_forward(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted during the second shard (2 batches of 2 rows per shard)
        calls.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    teacher.forward = failing_forward
    kwargs = dict(top_k=5, batch_size=2, shard_size=4, tokenizer=tiny_tokenizer, show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher_outputs(teacher, prepared, tmp_path / "cache", **kwargs)
    with pytest.raises(FileNotFoundError, match="interrupted"):
        load_teacher_cache(tmp_path / "cache")
    calls.clear()
    teacher.forward = lambda *a, **k: calls.append(k["input_ids"].shape[0]) or forward(*a, **k)
    cache_teacher_outputs(teacher, prepared, tmp_path / "cache", **kwargs)
    assert sum(calls) == len(prepared) - 4  # the first shard was kept
    teacher.forward = forward
    fresh = cache_teacher_outputs(teacher, prepared, tmp_path / "fresh", **kwargs)
    resumed, fresh = load_teacher_cache(tmp_path / "cache").dataset, load_teacher_cache(fresh).dataset
    for column in fresh.column_names:
        assert torch.equal(resumed[:][column], fresh[:][column]), column


def test_existing_cache_is_never_overwritten_without_overwrite(tmp_path, prepared, tiny_tokenizer):
    teacher = build_tiny_model(seed=1)
    kwargs = dict(top_k=3, shard_size=8, tokenizer=tiny_tokenizer, show_progress=False)
    out = cache_teacher_outputs(teacher, prepared, tmp_path / "cache", **kwargs)
    with pytest.raises(FileExistsError, match="overwrite"):
        cache_teacher_outputs(teacher, prepared, out, **kwargs)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        cache_teacher_outputs(teacher, prepared, tmp_path / "other", **kwargs)
    cache_teacher_outputs(teacher, prepared, out, **{**kwargs, "top_k": 4}, overwrite=True)
    assert load_teacher_cache(out).metadata["top_k"] == 4


@pytest.mark.parametrize("top_k", [0, 321, 2.5])
def test_top_k_out_of_range_is_refused_before_any_work(tmp_path, prepared, top_k):
    with pytest.raises(ValueError, match="top_k"):
        cache_teacher_outputs(build_tiny_model(seed=1), prepared, tmp_path / "cache", top_k=top_k)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("top_k", "tail_samples"), [(5, -1), (5, 1.5), (300, 21), (5, 256)])
def test_tail_samples_out_of_range_are_refused_before_any_work(tmp_path, prepared, top_k, tail_samples):
    with pytest.raises(ValueError, match="tail_samples"):
        cache_teacher_outputs(
            build_tiny_model(seed=1), prepared, tmp_path / "cache", top_k=top_k, tail_samples=tail_samples
        )
    assert not (tmp_path / "cache").exists()


def test_mismatched_cache_is_refused(tmp_path, prepared, tiny_tokenizer):
    from conftest import build_tiny_tokenizer

    teacher = build_tiny_model(seed=1)
    out = cache_teacher_outputs(
        teacher, prepared, tmp_path / "cache", top_k=3, shard_size=8, tokenizer=tiny_tokenizer, show_progress=False
    )
    other_tokenizer = build_tiny_tokenizer([text.upper() for text in TINY_TEXTS])
    with pytest.raises(ValueError, match="another tokenizer"):
        load_teacher_cache(out, tokenizer=other_tokenizer)
    with pytest.raises(ValueError, match="other teacher weights"):
        load_teacher_cache(out, teacher=build_tiny_model(seed=2))
    with pytest.raises(ValueError, match="max_length 24"):
        load_teacher_cache(out, max_length=32)
    with pytest.raises(ValueError, match="another dataset"):
        load_teacher_cache(out, dataset=prepared.select(range(1, len(prepared))))
    with pytest.raises(ValueError, match="temperatures"):
        load_teacher_cache(out, temperature=3.0)


def test_truncated_corrupted_or_missing_shards_are_refused(tmp_path, prepared, tiny_tokenizer):
    teacher = build_tiny_model(seed=1)
    out = cache_teacher_outputs(
        teacher, prepared, tmp_path / "cache", top_k=3, shard_size=8, tokenizer=tiny_tokenizer, show_progress=False
    )
    arrow = sorted((out / SHARDS_DIR / "shard-00001").glob("*.arrow"))[0]
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_teacher_cache(out)
    arrow.write_bytes(data[:-8] + bytes(8))  # same size, damaged content
    with pytest.raises(ValueError, match="corrupted"):
        load_teacher_cache(out)
    arrow.write_bytes(data)
    load_teacher_cache(out)
    import shutil

    shutil.rmtree(out / SHARDS_DIR / "shard-00002")
    with pytest.raises(FileNotFoundError, match="shard-00002"):
        load_teacher_cache(out)
    with pytest.raises(FileNotFoundError, match="No teacher cache"):
        load_teacher_cache(tmp_path / "nowhere")


@pytest.mark.multiprocess
def test_two_process_build_equals_one_process_build(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    completed = subprocess.run(
        [*command, str(WORKER), str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=180
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    sys.path.insert(0, str(WORKER.parent))
    from cache_worker import build

    build(str(tmp_path / "single"))
    ddp, single = load_teacher_cache(tmp_path / "ddp"), load_teacher_cache(tmp_path / "single")
    assert ddp.metadata["num_shards"] == single.metadata["num_shards"] > 2
    assert [s["files"] for s in ddp.metadata["shards"]] == [s["files"] for s in single.metadata["shards"]]
    for column in single.dataset.column_names:
        assert torch.equal(ddp.dataset[:][column], single.dataset[:][column]), column


# -- the trainer ------------------------------------------------------------------------------------------------


def _student():
    return build_tiny_model(
        seed=2, num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1
    )


def _train(tmp_path, name, train_dataset, teacher=None, **kwargs):
    from hf_recover import DistillationConfig, DistillationTrainer

    config = dict(
        output_dir=str(tmp_path / name),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        divergence="generalized_jsd",
    )
    args = DistillationConfig(**{**config, **kwargs.pop("config", {})})
    trainer = DistillationTrainer(_student(), teacher, args, train_dataset=train_dataset, **kwargs)
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "kd" in entry]
    return trainer, history


@pytest.mark.parametrize("path_or_columns", ["teacher_cache", "detected"])
def test_training_from_a_full_cache_equals_online_kd(tmp_path, prepared, tiny_tokenizer, path_or_columns):
    """top_k = vocabulary, float32: the same losses and the same weights after 3 steps, and no teacher loaded."""
    teacher = build_tiny_model(seed=1)
    out = cache_teacher_outputs(
        teacher,
        prepared,
        tmp_path / "cache",
        top_k=320,
        dtype="float32",
        tokenizer=tiny_tokenizer,
        show_progress=False,
    )
    online, online_history = _train(tmp_path, "online", prepared, teacher)
    if path_or_columns == "teacher_cache":
        cached, cached_history = _train(
            tmp_path, "cached", prepared, teacher_cache=out, processing_class=tiny_tokenizer
        )
    else:
        cached, cached_history = _train(tmp_path, "cached", load_teacher_cache(out).dataset)
    assert cached.teacher_model is None and cached._fused_cross_entropy
    assert len(cached_history) == 3
    for mine, reference in zip(cached_history, online_history, strict=True):
        for key in ("loss", "ce", "kd"):
            assert mine[key] == pytest.approx(reference[key], rel=1e-5), key
    for (name, weight), reference in zip(cached.model.named_parameters(), online.model.parameters(), strict=True):
        torch.testing.assert_close(weight, reference, rtol=1e-5, atol=1e-6, msg=name)


def test_training_from_a_top_64_float16_cache_is_a_lower_bound_of_online_kd(tmp_path, prepared, tiny_tokenizer):
    teacher = build_tiny_model(seed=1)
    out = cache_teacher_outputs(teacher, prepared, tmp_path / "cache", top_k=64, tail_samples=0, show_progress=False)
    _, online_history = _train(tmp_path, "online", prepared, teacher, config={"divergence": "forward_kl"})
    _, cached_history = _train(tmp_path, "cached", prepared, teacher_cache=out, config={"divergence": "forward_kl"})
    for mine, reference in zip(cached_history, online_history, strict=True):
        assert mine["ce"] == pytest.approx(reference["ce"], rel=1e-3)
        # The first step's weights are the same: there the bucketed KD is a lower bound of the full one (a random
        # tiny teacher is nearly uniform, so its 256-token tail holds much of the mass and the gap is large).
        assert 0 < mine["kd"] <= reference["kd"] * (1 + 1e-3)


def test_trainer_refuses_what_a_cache_cannot_give(tmp_path, prepared, tiny_tokenizer):
    teacher = build_tiny_model(seed=1)
    out = cache_teacher_outputs(teacher, prepared, tmp_path / "cache", top_k=8, tokenizer=tiny_tokenizer)
    cache = load_teacher_cache(out)
    with pytest.raises(ValueError, match="hidden states"):
        _train(tmp_path, "align", cache.dataset, config={"gamma": 0.5, "layer_map": "uniform"})
    with pytest.raises(ValueError, match="temperatures"):
        _train(tmp_path, "temperature", cache.dataset, config={"temperature": 3.0})
    with pytest.raises(ValueError, match="another dataset"):
        _train(tmp_path, "dataset", prepared.select(range(4)), teacher_cache=out)
    from conftest import build_tiny_tokenizer

    with pytest.raises(ValueError, match="another tokenizer"):
        _train(tmp_path, "tokenizer", None, teacher_cache=out, processing_class=build_tiny_tokenizer(TINY_TEXTS[:5]))


# -- the command line -------------------------------------------------------------------------------------------


def test_cli_cache_then_recover_from_it(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    from hf_recover.cli import main as cli
    from hf_recover.distill.trainer import DistillationTrainer

    trained = []
    train = DistillationTrainer.train

    def recording_train(self, *args, **kwargs):
        output = train(self, *args, **kwargs)
        kd = [entry["kd"] for entry in self.state.log_history if "kd" in entry]
        trained.append((self.teacher_model, self._cached_teacher_columns, kd))
        return output

    monkeypatch.setattr(DistillationTrainer, "train", recording_train)

    build_tiny_model("llama").save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "data").mkdir()
    for i in range(20):
        (tmp_path / "data" / f"doc{i}.txt").write_text(" ".join(TINY_TEXTS[(i + j) % 10] for j in range(3)))
    data = ["--dataset", str(tmp_path / "data"), "--max_length", "32"]
    teacher = ["--teacher", str(tmp_path / "teacher")]
    cache = ["--teacher_cache", str(tmp_path / "cache")]
    cli(["cache", *teacher, "--output_dir", str(tmp_path / "cache"), "--top_k", "16", "--shard_size", "4", *data])
    assert "bytes per token" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="overwrite"):
        cli(["cache", *teacher, "--output_dir", str(tmp_path / "cache"), *data])
    with pytest.raises(ValueError, match="max_length 32"):
        cli(
            [
                "recover",
                *teacher,
                "--prune",
                "last:3",
                *cache,
                "--dataset",
                str(tmp_path / "data"),
                "--max_length",
                "24",
            ]
        )
    steps = ["--max_steps", "2", "--logging_steps", "1", "--use_cpu", "--per_device_train_batch_size", "2"]
    steps += ["--gamma", "0"]  # the preset's alignment needs the teacher's hidden states, which a cache does not hold
    evaluation = ["--eval_max_length", "32", "--eval_blocks", "2"]
    out = tmp_path / "recovered"
    cli(["recover", *teacher, "--prune", "last:3", *cache, *data, *evaluation, *steps, "--output_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["perplexity"]["validation"]["recovered"] > 0
    [(teacher_model, cached_columns, kd)] = trained
    assert teacher_model is None and "teacher_top_ids" in cached_columns
    assert len(kd) == 2 and all(value > 0 for value in kd)
