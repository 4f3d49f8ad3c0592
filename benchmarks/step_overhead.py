"""What distillation costs per optimizer step, against its unavoidable parts: the student's own training step and
the teacher's forward pass.

Four variants on the same student, teacher and batches, each in a fresh subprocess (so that each peak RSS is its
own):
    (a) plain `Trainer`, cross-entropy on the student;
    (b) the teacher's forward pass alone (no_grad), batch by batch;
    (c) `DistillationTrainer`, 0.5·CE + 0.5·T²·forward KL (T = 2): logits KD (CE and KD in one pass);
    (d) `DistillationTrainer`, the full compound loss: + 0.5·hidden alignment + 0.5·FDD on the `kept` layer map.
Printed: the median seconds per optimizer step of each (after `--warmup` steps, over all rounds), the fastest and
slowest of those steps, the median CPU seconds per step (the process's, all threads), its peak RSS, and the ratios
(c)/((a)+(b)) and (d)/((a)+(b)), of wall and of CPU time, whose targets are <= 1.05 and <= 1.10: distillation
should cost no more than running the teacher next to a plain training step. The wall-time ratios are the targets;
the CPU-time ones are a second view, which a neighbour's load on a shared machine inflates less (not to nothing).

By default the student is the embedded SmolLM2-135M-Instruct teacher (30 blocks) with blocks
[3, 12, 13, 14, 15, 17] removed (24 blocks), batch 4 × 256 tokens, fp32, AdamW. `--tiny` runs tiny random
models for a smoke test in seconds.

Usage:
    python benchmarks/step_overhead.py                 # the default pair, about 5 minutes on 2 CPU cores
    python benchmarks/step_overhead.py --rounds 4      # benchmarks/README.md's figures (20 steps per variant)
    python benchmarks/step_overhead.py --tiny
    python benchmarks/step_overhead.py --steps 4 --rounds 3    # interleaved rounds on a busy machine
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

VARIANTS = {
    "a": "plain Trainer, CE",
    "b": "teacher forward alone",
    "c": "DistillationTrainer, logits KD",
    "d": "DistillationTrainer, CE+KD+align+FDD",
}
REMOVED_BLOCKS = [3, 12, 13, 14, 15, 17]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models (smoke run)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per variant, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the median")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=1, help="run the four variants this many times, interleaved")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--models", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) to leave steps to time.")
    return args


# -- parent: prepare the models once, run each variant in its own process -----------------------------------------


def prepare_models(folder: Path, tiny: bool) -> None:
    import torch

    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        teacher, removed = LlamaForCausalLM(config).eval(), [1, 4]
    else:
        from hf_recover import load_default_teacher

        teacher, _ = load_default_teacher()
        removed = REMOVED_BLOCKS
    harness.save_teacher_and_student(folder, teacher, removed)


def run_variant(variant: str, args, models: Path) -> dict:
    flags = {"--variant": variant, "--models": models, "--batch": args.batch, "--seq-len": args.seq_len}
    return harness.run_variant(
        __file__, {**flags, "--steps": args.steps, "--warmup": args.warmup, "--threads": args.threads}
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args)))
        return
    with tempfile.TemporaryDirectory(prefix="step_overhead_") as tmp:
        started = time.perf_counter()
        prepare_models(Path(tmp), args.tiny)
        # Rounds interleave the variants, so that a change of load on a shared machine hits them all alike.
        runs = {variant: [] for variant in VARIANTS}
        for round_index in range(args.rounds):
            for variant in VARIANTS:
                runs[variant].append(run_variant(variant, args, Path(tmp)))
                median = runs[variant][-1]["median_s"]
                print(f"  round {round_index + 1} ({variant}): {median:.3f} s", file=sys.stderr, flush=True)
        results = {}
        for variant, variant_runs in runs.items():
            timed = sorted(t for run in variant_runs for t in run["times"][args.warmup :])
            cpu = [t for run in variant_runs for t in run["cpu_times"][args.warmup :]]
            results[variant] = {
                "median_s": statistics.median(timed),
                "cpu_median_s": statistics.median(cpu),
                "range_s": (timed[0], timed[-1]),
                "peak_rss": max(run["peak_rss"] for run in variant_runs),
            }
    what = (
        "tiny random models" if args.tiny else f"SmolLM2-135M-Instruct teacher, 24-block student (-{REMOVED_BLOCKS})"
    )
    print(
        f"\n{what}; batch {args.batch} × {args.seq_len}; {args.rounds} round(s) of {args.steps} steps, "
        f"median after {args.warmup} warm-up step(s) per run"
    )
    # The range shows the step-to-step noise of the machine: on 2 shared cores single steps vary by 10-30%.
    # CPU seconds (the process's, all threads) are less sensitive to other tenants of the machine than wall time,
    # though not immune: cache and memory-bandwidth contention show in them too.
    print(f"{'variant':<44} {'s/step':>8} {'min-max':>15} {'CPU s/step':>11} {'peak RSS':>10}")
    for variant, label in VARIANTS.items():
        result = results[variant]
        low, high = result["range_s"]
        print(
            f"({variant}) {label:<40} {result['median_s']:>8.3f} {f'{low:.2f}-{high:.2f}':>15} "
            f"{result['cpu_median_s']:>11.3f} {result['peak_rss'] / 2**30:>8.2f} GB"
        )
    for key, what in (("median_s", "wall time"), ("cpu_median_s", "CPU time")):
        base = results["a"][key] + results["b"][key]
        print(
            f"{what}: (c)/((a)+(b)) = {results['c'][key] / base:.3f} (target <= 1.05), "
            f"(d)/((a)+(b)) = {results['d'][key] / base:.3f} (target <= 1.10)"
        )
    print(f"total wall time {time.perf_counter() - started:.0f} s")


# -- child: one variant ---------------------------------------------------------------------------------------------


def step_arguments(models: Path, args) -> dict:
    """The `TrainingArguments` every timed variant shares: the batch, constant LR 1e-4, no saving, no logging cost."""
    return dict(
        output_dir=str(models / f"run-{args.variant}"),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=args.steps,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )


class StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.started = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer.started[0])
                timer.cpu_times.append(time.process_time() - timer.started[1])

        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.callback = Callback()


def make_batches(vocab_size: int, args) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (args.steps * args.batch, args.seq_len), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def measure(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    from hf_recover import DistillationConfig, DistillationTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    models = Path(args.models)
    student_dir, teacher_dir = models / "student", models / "teacher"
    data = make_batches(AutoConfig.from_pretrained(student_dir).vocab_size, args)
    times: list[float]

    if args.variant == "b":
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
        times, cpu_times = [], []
        for start in range(0, len(data), args.batch):
            batch = {k: torch.stack([row[k] for row in data[start : start + args.batch]]) for k in data[0]}
            started, cpu_started = time.perf_counter(), time.process_time()
            with torch.no_grad():
                teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
    else:
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        common = step_arguments(models, args)
        timer = StepTimer()
        if args.variant == "a":
            trainer = Trainer(student, TrainingArguments(**common), train_dataset=data, callbacks=[timer.callback])
        else:
            teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
            extra = dict(gamma=0.5, delta=0.5, layer_map="kept") if args.variant == "d" else {}
            config = DistillationConfig(**common, alpha=0.5, beta=0.5, temperature=2.0, **extra)
            trainer = DistillationTrainer(student, teacher, config, train_dataset=data, callbacks=[timer.callback])
        trainer.train()
        times, cpu_times = timer.times, timer.cpu_times
    peak_rss = harness.peak_rss_bytes()
    median = statistics.median(times[args.warmup :])
    return {"variant": args.variant, "median_s": median, "times": times, "cpu_times": cpu_times, "peak_rss": peak_rss}


if __name__ == "__main__":
    main()
