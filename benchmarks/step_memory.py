"""How much memory a distillation step needs, against a plain fine-tuning step: the fused lm_head.

Three variants on the same student, teacher and batches, each in a fresh subprocess (so that each peak RSS is its
own):
    (a) plain `Trainer`, cross-entropy on the student (no teacher at all);
    (b) `DistillationTrainer`, 0.5·CE + 0.5·T²·forward KL (T = 2), `fused_lm_head=False`: the student's logits, their
        gradient and the teacher's logits exist whole (the chunked loss bounds only its own temporaries);
    (c) the same with the fused lm_head (the default): both models run to their final hidden states and their
        lm_heads run inside the loss, chunk by chunk, so neither model's logits exist whole.
Sizes: the embedded SmolLM2-135M-Instruct teacher with a 24-block student (vocabulary 49,152) at 4 × 256 and
4 × 1024 tokens, and a Qwen2-shaped pair of tiny depth (2 and 1 blocks, hidden 896, tied embeddings) with
Qwen's 151,936-token vocabulary at 4 × 512 tokens. fp32, AdamW, CPU.

Printed per size: peak RSS and median s/step of each variant, and the lines
    fused/plain CE peak memory at SIZE: R      target <= 1.05 at 4x256, <= 1.0 at 4x1024 and at the large vocabulary
    fused/logits KD peak memory at SIZE: R     target <= 0.7 at the large vocabulary
    fused/logits KD step time at SIZE: R       target <= 1.05
(c) also holds the teacher's weights, which (a) does not: the targets ask for a distillation step no heavier than
plain fine-tuning all the same.

Usage:
    python benchmarks/step_memory.py                    # all sizes, about 15 minutes on 2 CPU cores
    python benchmarks/step_memory.py --sizes 4x256      # one size
    python benchmarks/step_memory.py --tiny             # tiny random models, a smoke run in seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
from step_overhead import REMOVED_BLOCKS, StepTimer, make_batches, step_arguments

VARIANTS = {
    "a": "plain Trainer, CE",
    "b": "DistillationTrainer, logits KD",
    "c": "DistillationTrainer, fused lm_head",
}
SIZES = {  # name: (models, batch, sequence length)
    "4x256": ("smollm2", 4, 256),
    "4x1024": ("smollm2", 4, 1024),
    "qwen2-vocab-4x512": ("qwen2-vocab", 4, 512),
}
TARGETS = {  # (fused/plain CE, fused/logits KD) peak-memory targets per size
    "4x256": (1.05, None),
    "4x1024": (1.0, None),
    "qwen2-vocab-4x512": (1.0, 0.7),
}
STEP_TIME_TARGET = 1.05


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    parser.add_argument("--tiny", action="store_true", help="tiny random models (smoke run)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per variant, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the median")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) to leave steps to time.")
    return args


# -- parent: prepare each pair of models once, run each variant in its own process ----------------------------------


def prepare_models(folder: Path, kind: str, tiny: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    if tiny:
        config = Qwen2Config(
            vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
        teacher, removed = AutoModelForCausalLM.from_config(config).eval(), [1]
    elif kind == "qwen2-vocab":
        # Qwen2-0.5B's widths and vocabulary at a depth that fits beside the logits on this machine.
        config = Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2, num_attention_heads=14,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=2048,
        )  # fmt: skip
        teacher, removed = AutoModelForCausalLM.from_config(config).eval(), [1]
    else:
        from hf_recover import load_default_teacher

        teacher, _ = load_default_teacher()
        removed = REMOVED_BLOCKS
    harness.save_teacher_and_student(folder, teacher, removed)


def run_variant(variant: str, args, models: Path, batch: int, seq_len: int) -> dict:
    flags = {"--variant": variant, "--models": models, "--batch": batch, "--seq-len": seq_len}
    return harness.run_variant(__file__, {**flags, "--steps": args.steps, "--warmup": args.warmup})


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args)))
        return
    started = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="step_memory_") as tmp:
        prepared: dict[str, Path] = {}
        for size in args.sizes:
            kind, batch, seq_len = SIZES[size]
            if args.tiny:
                kind, batch, seq_len = "tiny", 2, 64
            if kind not in prepared:
                prepared[kind] = Path(tmp) / kind
                prepare_models(prepared[kind], kind, args.tiny)
            results[size] = {}
            for variant in VARIANTS:
                results[size][variant] = run_variant(variant, args, prepared[kind], batch, seq_len)
                print(f"  {size} ({variant}) done", file=sys.stderr, flush=True)

    print(f"\n{args.steps} steps per variant, median after {args.warmup} warm-up step(s); fp32, AdamW, CPU")
    for size, by_variant in results.items():
        kind, batch, seq_len = SIZES[size]
        what = "tiny random models, batch 2 × 64" if args.tiny else f"{kind}, batch {batch} × {seq_len}"
        print(f"\n{size}: {what}")
        print(f"{'variant':<40} {'peak RSS':>10} {'s/step':>8}")
        for variant, label in VARIANTS.items():
            result = by_variant[variant]
            print(f"({variant}) {label:<36} {result['peak_rss'] / 2**30:>7.2f} GB {result['median_s']:>8.3f}")
    print()
    for size, by_variant in results.items():
        plain_target, logits_target = TARGETS[size]
        peak = {variant: by_variant[variant]["peak_rss"] for variant in VARIANTS}
        ratio = peak["c"] / peak["a"]
        print(f"fused/plain CE peak memory at {size}: {ratio:.3f} (target <= {plain_target})")
        ratio = peak["c"] / peak["b"]
        print(
            f"fused/logits KD peak memory at {size}: {ratio:.3f}"
            + (f" (target <= {logits_target})" * bool(logits_target))
        )
        ratio = by_variant["c"]["median_s"] / by_variant["b"]["median_s"]
        print(f"fused/logits KD step time at {size}: {ratio:.3f} (target <= {STEP_TIME_TARGET})")
    print(f"total wall time {time.perf_counter() - started:.0f} s")


# -- child: one variant ---------------------------------------------------------------------------------------------


def measure(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    from hf_recover import DistillationConfig, DistillationTrainer

    models = Path(args.models)
    student_dir, teacher_dir = models / "student", models / "teacher"
    data = make_batches(AutoConfig.from_pretrained(student_dir).vocab_size, args)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    common = step_arguments(models, args)
    timer = StepTimer()
    if args.variant == "a":
        trainer = Trainer(student, TrainingArguments(**common), train_dataset=data, callbacks=[timer.callback])
    else:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        config = DistillationConfig(**common, alpha=0.5, beta=0.5, temperature=2.0, fused_lm_head=args.variant == "c")
        trainer = DistillationTrainer(student, teacher, config, train_dataset=data, callbacks=[timer.callback])
        assert trainer._fused_heads == ((True, True) if args.variant == "c" else (False, False))
    trainer.train()
    peak_rss = harness.peak_rss_bytes()
    median = statistics.median(timer.times[args.warmup :])
    return {"variant": args.variant, "median_s": median, "times": timer.times, "peak_rss": peak_rss}


if __name__ == "__main__":
    main()
