"""What training from a teacher cache costs per step, against plain CE and online KD, and what the cache costs.

Variants on the same student, teacher and rows, each in a fresh subprocess (so that each peak RSS is its own):
    (a) plain `Trainer`, cross-entropy on the student;
    (b) `DistillationTrainer`, 0.5·CE + 0.5·T²·forward KL (T = 2), the teacher run online;
    (c) `DistillationTrainer`, the same loss from a teacher cache at `--top_k` with `--tail-samples` tail samples
        (no teacher in memory);
    (t) the teacher's forward pass alone (no_grad), batch by batch, for the build throughput.
and, once before them, the cache build itself (`hf_recover.cache_teacher_outputs`).

Printed: median seconds per optimizer step of (a), (b), (c) after `--warmup` steps, their peak RSS, the ratios
(c)/(a) (target <= 1.10; 1.0 is the physical limit: a cached step still runs the student's step) and (c)/(b), the
cache's bytes per token on disk (the whole dataset: model inputs and teacher columns; target <= 400 at k = 64),
and the build's throughput against the teacher forward alone (target >= 0.9), with and without the one-time
fingerprint of the teacher's weights. The lines `cached/plain CE step ratio: R` and `bytes per token: B` are
printed as such. Then, on real text (the default corpus, not `--tiny`), the error of the cached KD term against the
full-vocabulary one for each divergence at T = 1 and T = 2: relative error of the value, cosine and norm ratio of
the gradients.
`--quality` adds the demo protocol's recovery (validation and `ood`) of online KD, of KD from the top-k cache with
the tail as one bucket, and of KD from the same cache with its tail samples.

Defaults: the embedded SmolLM2-135M-Instruct teacher (30 blocks), the student with blocks [3, 12, 13, 14, 15, 17]
removed (24 blocks), batch 4 × 256 tokens, fp32, AdamW. `--tiny` runs tiny random models for a smoke test.

Usage:
    python benchmarks/teacher_cache.py --tiny
    python benchmarks/teacher_cache.py                 # a few minutes on 2 CPU cores
    python benchmarks/teacher_cache.py --rounds 3      # interleaved rounds on a busy machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import harness
from step_overhead import REMOVED_BLOCKS, StepTimer, prepare_models, step_arguments

VARIANTS = {
    "a": "plain Trainer, CE",
    "b": "DistillationTrainer, online logits KD",
    "c": "DistillationTrainer, KD from the cache",
    "t": "teacher forward alone",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models (smoke run)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--tail-samples", type=int, default=16, help="tail tokens sampled per position")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per variant, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the median")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=1, help="run the variants this many times, interleaved")
    parser.add_argument("--quality", action="store_true", help="also the demo protocol's recovery (slow)")
    parser.add_argument("--quality-steps", type=int, default=30)
    parser.add_argument("--variant", choices=[*VARIANTS, "build", "error"], help=argparse.SUPPRESS)  # child
    parser.add_argument("--models", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) to leave steps to time.")
    return args


# -- parent ---------------------------------------------------------------------------------------------------------


def run_variant(variant: str, args, models: Path) -> dict:
    flags = {"--variant": variant, "--models": models, "--top-k": args.top_k, "--tail-samples": args.tail_samples}
    flags.update({"--batch": args.batch, "--seq-len": args.seq_len, "--steps": args.steps, "--warmup": args.warmup})
    return harness.run_variant(__file__, {**flags, "--threads": args.threads})


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args)))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="teacher_cache_") as tmp:
        models = Path(tmp)
        prepare_models(models, args.tiny)
        build = run_variant("build", args, models)
        print(f"  cache built in {build['seconds']:.2f} s", file=sys.stderr, flush=True)
        runs = {variant: [] for variant in VARIANTS}
        for round_index in range(args.rounds):  # interleaved: a change of load hits every variant alike
            for variant in VARIANTS:
                runs[variant].append(run_variant(variant, args, models))
                print(f"  round {round_index + 1} ({variant}): {runs[variant][-1]['median_s']:.3f} s", file=sys.stderr)
        results = {
            variant: {
                "median_s": statistics.median(t for run in variant_runs for t in run["times"][args.warmup :]),
                "total_s": statistics.median(sum(run["times"]) for run in variant_runs),
                "peak_rss": max(run["peak_rss"] for run in variant_runs),
            }
            for variant, variant_runs in runs.items()
        }
        error = None if args.tiny else run_variant("error", args, models)["errors"]
        quality = measure_quality(args, models) if args.quality and not args.tiny else None

    what = (
        "tiny random models" if args.tiny else f"SmolLM2-135M-Instruct teacher, 24-block student (-{REMOVED_BLOCKS})"
    )
    print(
        f"\n{what}; batch {args.batch} × {args.seq_len}; top_k {args.top_k} + {args.tail_samples} tail samples; "
        f"{args.rounds} round(s) of {args.steps} steps"
    )
    print(f"{'variant':<46} {'s/step':>8} {'peak RSS':>10}")
    for variant in "abc":
        result = results[variant]
        print(f"({variant}) {VARIANTS[variant]:<42} {result['median_s']:>8.3f} {result['peak_rss'] / 2**30:>8.2f} GB")
    print(f"(t) {VARIANTS['t']:<42} {results['t']['median_s']:>8.3f} (per batch)")
    ratio = results["c"]["median_s"] / results["a"]["median_s"]
    print(f"cached/plain CE step ratio: {ratio:.3f} (target <= 1.10)")
    print(f"cached/online KD step ratio: {results['c']['median_s'] / results['b']['median_s']:.3f}")
    print(f"bytes per token: {build['bytes_per_token']:.1f} (target <= 400 at k = 64)")
    print(f"  of which teacher columns: {build['teacher_bytes_per_token']:.1f}")
    forward_rows_per_s = args.batch / results["t"]["median_s"]
    build_rows = build["rows"] / build["seconds"]
    build_rows_loop = build["rows"] / (build["seconds"] - build["fingerprint_s"])
    print(
        f"cache build throughput: {build_rows:.2f} rows/s, {build_rows_loop:.2f} without the one-time weights "
        f"fingerprint ({build['fingerprint_s']:.2f} s); teacher forward alone {forward_rows_per_s:.2f} rows/s; "
        f"ratio {build_rows / forward_rows_per_s:.3f} / {build_rows_loop / forward_rows_per_s:.3f} (target >= 0.9)"
    )
    if error is not None:
        print(f"cached top-{args.top_k} KD against full-vocabulary KD on the default corpus (student vs teacher):")
        header = f"{'divergence':<18} {'T':>3} {'full':>9} {'cached':>9} {'rel. error':>10} {'grad cosine':>12}"
        print(f"{header} {'grad norm ratio':>16}")
        for row in error:
            print(
                f"{row['divergence']:<18} {row['temperature']:>3g} {row['full']:>9.4f} {row['cached']:>9.4f} "
                f"{row['relative_error']:>10.2%} {row['gradient_cosine']:>12.5f} {row['gradient_norm_ratio']:>16.3f}"
            )
    if quality is not None:
        print(f"recovery in the demo protocol, {4 * args.quality_steps * 256:,} tokens (validation / ood):")
        for name, figures in quality.items():
            print(f"  {name:<34} {figures['validation']:6.1f} % / {figures['ood']:6.1f} %")
        for name in ("top-k cache", "top-k cache + tail samples"):
            gaps = [quality[name][split] - quality["online"][split] for split in ("validation", "ood")]
            print(f"recovery difference {name} - online: {gaps[0]:+.2f} / {gaps[1]:+.2f} points (target |.| <= 1)")
    print(f"total wall time {time.perf_counter() - started:.0f} s")


# -- children -------------------------------------------------------------------------------------------------------


def make_rows(vocab_size: int, args):
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (args.steps * args.batch, args.seq_len), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * args.seq_len] * len(ids), "labels": ids})


def measure(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    from hf_recover import DistillationConfig, DistillationTrainer
    from hf_recover.distill.fingerprints import weights_fingerprint
    from hf_recover.distill.teacher_cache import cache_teacher_outputs, load_teacher_cache

    if args.threads:
        torch.set_num_threads(args.threads)
    models = Path(args.models)
    student_dir, teacher_dir, cache_dir = models / "student", models / "teacher", models / "cache"
    rows = make_rows(AutoConfig.from_pretrained(student_dir).vocab_size, args)
    result: dict = {"variant": args.variant}
    if args.variant == "error":
        return {**result, "errors": measure_kd_error(args, models)}
    if args.variant in ("build", "t"):
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    if args.variant == "build":
        started = time.perf_counter()
        cache_teacher_outputs(
            teacher, rows, cache_dir, top_k=args.top_k, tail_samples=args.tail_samples, batch_size=args.batch,
            show_progress=False, overwrite=True,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        fingerprint_started = time.perf_counter()
        weights_fingerprint(teacher)
        metadata = load_teacher_cache(cache_dir).metadata
        ids_bytes = 2 if metadata["token_id_dtype"] == "uint16" else 4
        teacher_bytes = args.top_k * (ids_bytes + 2) + 4 * len(metadata["temperatures"])
        teacher_bytes += args.tail_samples * (ids_bytes + 2 + 1)
        return {
            **result,
            "seconds": seconds,
            "fingerprint_s": time.perf_counter() - fingerprint_started,
            "rows": len(rows),
            "bytes_per_token": metadata["bytes_per_token"],
            "teacher_bytes_per_token": teacher_bytes,
        }
    if args.variant == "t":
        times = []
        batches = rows.with_format("torch")
        for start in range(0, len(rows), args.batch):
            batch = batches[start : start + args.batch]
            started = time.perf_counter()
            with torch.no_grad():
                teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            times.append(time.perf_counter() - started)
    else:
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        common = step_arguments(models, args)
        timer = StepTimer()
        if args.variant == "a":
            trainer = Trainer(student, TrainingArguments(**common), train_dataset=rows, callbacks=[timer.callback])
        else:
            config = DistillationConfig(**common, alpha=0.5, beta=0.5, temperature=2.0)
            if args.variant == "b":
                teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
                trainer = DistillationTrainer(student, teacher, config, train_dataset=rows, callbacks=[timer.callback])
            else:
                trainer = DistillationTrainer(
                    student, None, config, teacher_cache=cache_dir, callbacks=[timer.callback]
                )
        trainer.train()
        times = timer.times
    peak_rss = harness.peak_rss_bytes()
    return {**result, "median_s": statistics.median(times[args.warmup :]), "times": times, "peak_rss": peak_rss}


def measure_kd_error(args, models: Path) -> list[dict]:
    """The cached KD term (float16 top-k, as stored) against the full-vocabulary one, on default-corpus text."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_recover.base.data import load_text_splits, prepare_recovery_dataset
    from hf_recover.base.loading import load_model
    from hf_recover.base.losses import DIVERGENCES, TopKTeacher, teacher_top_k

    teacher, tokenizer = load_model("default")
    student = AutoModelForCausalLM.from_pretrained(models / "student", dtype=torch.float32).eval()
    text = load_text_splits()["validation"]
    rows = prepare_recovery_dataset(text, tokenizer, max_length=args.seq_len).select(range(args.batch))
    input_ids = torch.tensor(rows["input_ids"])
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids).logits
        student_logits = student(input_ids=input_ids).logits
    batch, length, vocab = teacher_logits.shape
    errors = []
    for temperature in (1.0, 2.0):
        ids, top, tails = teacher_top_k(teacher_logits.reshape(-1, vocab), args.top_k, (temperature,))
        cached = TopKTeacher(
            ids.view(batch, length, -1), top.half().float().view(batch, length, -1), tails[:, 0].view(batch, length)
        )
        for name, divergence in DIVERGENCES.items():
            values, grads = [], []
            for teacher_side in (teacher_logits, cached):
                logits = student_logits.clone().requires_grad_()
                value = divergence(logits, teacher_side, input_ids, temperature=temperature)
                value.backward()
                values.append(value.item())
                grads.append(logits.grad.flatten())
            errors.append(
                {
                    "divergence": name,
                    "temperature": temperature,
                    "full": values[0],
                    "cached": values[1],
                    "relative_error": (values[1] - values[0]) / values[0],
                    "gradient_cosine": torch.nn.functional.cosine_similarity(*grads, dim=0).item(),
                    "gradient_norm_ratio": (grads[1].norm() / grads[0].norm()).item(),
                }
            )
    return errors


def measure_quality(args, models: Path) -> dict[str, dict[str, float]]:
    """The demo protocol (default corpus, packed 256-token blocks, AdamW 1e-4 constant, batch 4 × 256 tokens,
    0.5·CE + 0.5·T²·forward KL at T = 2): recovery % (validation and ood) of online KD, of KD from the top-k cache
    with the tail as one bucket, and from the same cache with its tail samples, at the same number of steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_recover import DistillationConfig, cache_teacher_outputs, load_teacher_cache
    from hf_recover.base.data import load_text_splits, prepare_eval_splits, prepare_recovery_dataset
    from hf_recover.base.loading import load_model
    from hf_recover.distill.teacher_cache import tail_sample_columns
    from hf_recover.recovery import run_recovery

    teacher, tokenizer = load_model("default")
    splits = load_text_splits()
    train = prepare_recovery_dataset(splits["train"], tokenizer, max_length=256)
    train = train.select(range(min(4 * args.quality_steps, len(train))))
    eval_splits = prepare_eval_splits(splits, tokenizer)
    cache_dir = models / "quality-cache"
    cache_teacher_outputs(
        teacher, train, cache_dir, top_k=args.top_k, tail_samples=args.tail_samples, tokenizer=tokenizer,
        overwrite=True,
    )  # fmt: skip
    cache = load_teacher_cache(cache_dir, tokenizer=tokenizer, dataset=train, temperature=2.0)
    bucket_only = replace(
        cache, dataset=cache.dataset.remove_columns(list(tail_sample_columns(cache.dataset.column_names)))
    )
    runs = {"online": None, "top-k cache": bucket_only, "top-k cache + tail samples": cache}
    figures = {}
    for name, teacher_cache in runs.items():
        student = AutoModelForCausalLM.from_pretrained(models / "student", dtype=torch.float32)
        config = DistillationConfig(
            output_dir=str(models / f"quality-{name.replace(' ', '-')}"),
            report_to="none",
            use_cpu=True,
            per_device_train_batch_size=4,
            max_steps=args.quality_steps,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            alpha=0.5,
            beta=0.5,
            temperature=2.0,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        _, result = run_recovery(
            teacher=teacher,
            student=student,
            tokenizer=tokenizer,
            args=config,
            train_dataset=train,
            eval_splits=eval_splits,
            save=False,
            teacher_cache=teacher_cache,
        )
        figures[name] = {split: 100 * result.recovery(split)["recovery"] for split in ("validation", "ood")}
        print(f"  quality {name}: {figures[name]}", file=sys.stderr, flush=True)
    return figures


if __name__ == "__main__":
    main()
