"""float32 against bfloat16, in one run: the demo's training step, evaluation, generation, and the figures a short
recovery reaches in each type.

The student is the embedded SmolLM2-135M-Instruct teacher (30 blocks) with blocks [3, 12, 13, 14, 15, 17] removed,
trained with `DistillationConfig.for_depth_recovery()` (the demo's recipe, batches of 2 × 256 tokens of the demo's
text) for `--steps` steps in each type from the same cut and seed: float32, then `--bf16` (Trainer's autocast over
float32 weights). Printed, for each type:
    - training: the median seconds per optimizer step after `--warmup` steps;
    - evaluation: the teacher's perplexity on `--eval_blocks` validation blocks of 512 tokens, and its time;
    - generation: the teacher's greedy answers to `--prompts` of the `test` chat prompts (up to `--new_tokens`
      tokens, in batches of 48 as the demo's evaluation), in new tokens per second, under autocast and with the
      weights themselves in bfloat16, beside a teacher-forced forward's tokens per second over the same tokens;
    - the figures of the short recovery: validation and ood perplexity of each student, each measured in its own
      type (as `hf-recover recover` reports it), and the bfloat16 student measured in float32 too;
and the ratios bfloat16 / float32 beside the targets (step <= 0.65, evaluation <= 0.6, generation <= 0.7; the
recovered figures within 1% of float32's). Each timed measure runs once untimed first (kernels chosen, weights
packed); evaluation and generation are timed `--rounds` times, the two types alternating, and the fastest round of
each is kept. Timings are the machine's: run it alone.

Usage:
    python benchmarks/bf16.py                    # about 9 minutes on 2 CPU cores
    python benchmarks/bf16.py --steps 60         # a longer recovery for the figures
    python benchmarks/bf16.py --tiny             # tiny random models, a smoke run in seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

REMOVED_BLOCKS = [3, 12, 13, 14, 15, 17]
TARGETS = {"training step": 0.65, "evaluation": 0.6, "generation (autocast)": 0.7, "generation (bf16 weights)": 0.7}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps of each recovery (timed and scored).")
    parser.add_argument("--warmup", type=int, default=3, help="Steps left out of the median step time.")
    parser.add_argument("--eval_blocks", type=int, default=16, help="Validation and ood blocks of 512 tokens.")
    parser.add_argument("--prompts", type=int, default=48, help="Chat prompts answered by the teacher, in one batch.")
    parser.add_argument("--new_tokens", type=int, default=64, help="Longest answer, in tokens.")
    parser.add_argument(
        "--rounds", type=int, default=3, help="Evaluation and generation are timed this many times, the two types "
        "alternating; the fastest of each is kept (single runs on a shared machine vary by 10-20%%)."
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="Tiny random models: a smoke run.")
    parser.add_argument("--json", default=None, help="Also write the figures to this file.")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must be more than --warmup ({args.warmup}).")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}.")
    return args


def load(args):
    """Teacher, tokenizer, the demo's text and evaluation splits, and the cut student."""
    import torch

    from hf_recover import prune_depth

    if args.tiny:
        import sys
        from pathlib import Path

        from datasets import Dataset

        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from conftest import TINY_TEXTS, build_tiny_chat_tokenizer, build_tiny_model  # the tests' tiny models

        from hf_recover.base.data import prepare_recovery_dataset

        teacher, tokenizer = build_tiny_model(seed=0, num_hidden_layers=4), build_tiny_chat_tokenizer()
        text = prepare_recovery_dataset(Dataset.from_dict({"text": TINY_TEXTS * 8}), tokenizer, max_length=32)
        splits = {"validation": text.select(range(4)), "ood": text.select(range(4, 8))}
        student, _ = prune_depth(teacher, remove=[1])
        return teacher, tokenizer, text, splits, student, [[1, 2, 3, 4]] * args.prompts
    from protocol import demo_protocol

    from hf_recover.base.chat import render_prompt
    from hf_recover.base.chat_retention import load_chat_prompts

    protocol = demo_protocol(eval_blocks=args.eval_blocks, held_out=False)
    teacher, tokenizer = protocol.teacher, protocol.tokenizer
    student, _ = prune_depth(teacher, remove=REMOVED_BLOCKS)
    student.requires_grad_(True)
    prompts = [render_prompt(tokenizer, p) for p in load_chat_prompts("test")[: args.prompts]]
    torch.manual_seed(0)
    return teacher, tokenizer, protocol.text, protocol.eval_splits, student, prompts


def recover(teacher, tokenizer, student, text, splits, *, bf16: bool, args, folder) -> dict:
    """A short recovery in one type: its median step time and the figures it reaches."""
    from transformers import TrainerCallback

    from hf_recover import DistillationConfig, DistillationTrainer
    from hf_recover.base.precision import autocast_to
    from hf_recover.distill.evaluation_cache import evaluate_splits

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.started)

    config = DistillationConfig.for_depth_recovery(
        output_dir=f"{folder}/{'bf16' if bf16 else 'fp32'}", max_steps=args.steps, bf16=bf16, seed=42,
        report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=args.steps,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teacher, args=config, train_dataset=text,
        processing_class=tokenizer, callbacks=[StepTimer()],
    )  # fmt: skip
    trainer.train()
    with autocast_to(bf16, "cpu"):  # (accelerate keeps the trained model's forward under the run's autocast)
        own = evaluate_splits({"student": trainer.model}, splits)
    figures = {"step_s": statistics.median(times[args.warmup :])}
    figures.update({f"{split} PPL": values["student"] for split, values in own.items()})
    if bf16:  # the same student measured in float32: what training in bfloat16 did, apart from evaluating in it
        plain = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        full = evaluate_splits({"student": plain}, splits)
        figures.update({f"{split} PPL, measured in float32": values["student"] for split, values in full.items()})
    return figures


def evaluation(teacher, splits, bf16: bool) -> dict:
    from hf_recover.base.evaluation import evaluate_perplexity
    from hf_recover.base.precision import autocast_to

    with autocast_to(bf16, "cpu"):
        evaluate_perplexity(teacher, splits["validation"], max_batches=1)  # warm-up: kernels chosen, weights packed
        started = time.perf_counter()
        perplexity = evaluate_perplexity(teacher, splits["validation"])["perplexity"]
        return {"seconds": time.perf_counter() - started, "teacher validation PPL": perplexity}


def generation(model, tokenizer, prompts, args, bf16: bool) -> dict:
    """New tokens per second of greedy answers, and a teacher-forced forward's tokens per second over the same
    prompts and answers (what writing them costs against reading them)."""
    from hf_recover.base.chat import end_of_turn_ids, pad_id
    from hf_recover.base.generation import Sampling, forward_tokens_per_second, generate_completions
    from hf_recover.base.precision import autocast_to

    stop = end_of_turn_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    sampling = Sampling(max_new_tokens=args.new_tokens)
    with autocast_to(bf16, "cpu"):
        generate_completions(model, prompts[:2], stop_ids=stop, pad_id=pad, sampling=Sampling(max_new_tokens=4))
        started = time.perf_counter()
        answers = generate_completions(model, prompts, stop_ids=stop, pad_id=pad, sampling=sampling, batch_size=48)
        seconds = time.perf_counter() - started
        forward = forward_tokens_per_second(model, [p + a for p, a in zip(prompts, answers)], pad)
    tokens = sum(len(answer) for answer in answers)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "answers": answers, "forward_tokens_per_s": forward}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from hf_recover.base.precision import bf16_supported

    teacher, tokenizer, text, splits, student, prompts = load(args)
    print(f"bfloat16 native on this CPU: {bf16_supported('cpu')}; threads: {torch.get_num_threads()}", flush=True)
    results = {"fp32": {}, "bf16": {}}
    half = copy.deepcopy(teacher).to(torch.bfloat16)
    rounds = {name: {} for name in results}
    for _ in range(args.rounds):  # the two types alternate, so that a slow spell of the machine hits both
        for name, bf16 in (("fp32", False), ("bf16", True)):
            best(rounds[name], "evaluation", evaluation(teacher, splits, bf16), "seconds")
            best(rounds[name], "generation (autocast)", generation(teacher, tokenizer, prompts, args, bf16))
        best(rounds["bf16"], "generation (bf16 weights)", generation(half, tokenizer, prompts, args, False))
    for name in results:
        results[name].update(rounds[name])
    results["fp32"]["generation (bf16 weights)"] = results["fp32"]["generation (autocast)"]
    with tempfile.TemporaryDirectory() as folder:
        for name, bf16 in (("fp32", False), ("bf16", True)):
            results[name]["recovery"] = recover(
                teacher, tokenizer, student, text, splits, bf16=bf16, args=args, folder=folder
            )
    print(report(results, args))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    k: {m: {f: v for f, v in d.items() if f != "answers"} for m, d in r.items()}
                    for k, r in results.items()
                },
                handle,
                indent=1,
            )


def best(kept: dict, measure: str, result: dict, key: str = "tokens_per_s") -> None:
    """Keep `result` for `measure` when it is the fastest round so far (least seconds, most tokens per second)."""
    faster = (lambda a, b: a < b) if key == "seconds" else (lambda a, b: a > b)
    if measure not in kept or faster(result[key], kept[measure][key]):
        kept[measure] = result


def report(results: dict, args) -> str:
    fp32, bf16 = results["fp32"], results["bf16"]
    rows = [
        ("training step", fp32["recovery"]["step_s"], bf16["recovery"]["step_s"], "s"),
        ("evaluation", fp32["evaluation"]["seconds"], bf16["evaluation"]["seconds"], "s"),
    ]
    for kind in ("generation (autocast)", "generation (bf16 weights)"):
        # tokens per second: the ratio of times is the inverse
        rows.append((kind, 1 / fp32[kind]["tokens_per_s"], 1 / bf16[kind]["tokens_per_s"], "s/token"))
    lines = ["| measure | float32 | bfloat16 | bf16 / fp32 | target |", "|---|---:|---:|---:|---:|"]
    for measure, a, b, unit in rows:
        shown = (f"{1 / a:.1f} tok/s", f"{1 / b:.1f} tok/s") if unit == "s/token" else (f"{a:.2f} s", f"{b:.2f} s")
        lines.append(f"| {measure} | {shown[0]} | {shown[1]} | {b / a:.2f} | <= {TARGETS[measure]} |")
    same = sum(
        a == b for a, b in zip(fp32["generation (autocast)"]["answers"], bf16["generation (autocast)"]["answers"])
    )
    count = len(fp32["generation (autocast)"]["answers"])
    lines.append(f"\nGreedy answers identical to float32's under autocast: {same} of {count}")
    for name, kind in (("float32", fp32), ("bfloat16", bf16)):
        run = kind["generation (autocast)"]
        lines.append(
            f"Generation in {name}: {run['tokens_per_s']:.0f} new tokens/s; a forward over the same prompts and "
            f"answers reads {run['forward_tokens_per_s']:.0f} tokens/s"
        )
    a, b = fp32["evaluation"]["teacher validation PPL"], bf16["evaluation"]["teacher validation PPL"]
    lines.append(f"Teacher's validation perplexity: {a:.3f} in float32, {b:.3f} in bfloat16 ({b / a - 1:+.2%})")
    lines += [
        f"\nAfter {args.steps} steps of recovery:",
        "| figure | float32 | bfloat16 | difference | within 1%? |",
        "|---|---:|---:|---:|---|",
    ]
    for figure, value in bf16["recovery"].items():
        if figure == "step_s":
            continue
        reference = fp32["recovery"][figure.removesuffix(", measured in float32")]
        change = value / reference - 1
        lines.append(
            f"| {figure} | {reference:.3f} | {value:.3f} | {change:+.2%} | {'yes' if change <= 0.01 else 'no'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
