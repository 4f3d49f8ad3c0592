"""Recovery quality: hf_recover's recommended recipe against the naive one, at equal token budgets.

    python benchmarks/recovery_quality.py                 # the demo's protocol; about 25 minutes on 2 CPU cores
    python benchmarks/recovery_quality.py --quick         # a smoke run: 2,048 and 4,096 tokens, 4 evaluation blocks
    python benchmarks/recovery_quality.py --only recommended --budgets 30720 --set learning_rate=2e-4

The protocol is `hf-recover demo`'s: SmolLM2-135M-Instruct (30 blocks) and the default offline corpus
(400 training documents packed into 256-token blocks), 6 blocks removed, AdamW, batches of 4 × 256
tokens in the Trainer's seeded order, perplexity on the first 32 packed 512-token blocks of
`validation` and `ood` (a domain never trained on). Two students train side by side:

1. naive: what a user writes by hand, a plain `transformers.Trainer` subclass with
   `0.5·CE + 0.5·T²·KL(teacher ‖ student)`, T = 2, lr 1e-4 constant, batches of 4 × 256 tokens, on the student
   pruned by block influence (16 calibration blocks) without healing;
2. recommended: the demo's student (pruned and healed as `DEMO_DEFAULTS["prune"]` says, on the default 64
   calibration blocks) trained with `DistillationConfig.for_depth_recovery()` (its own batch size).

Both are evaluated at 15,360, 30,720 and 61,440 training tokens and once before training.
Recovery % = (PPL_pruned − PPL) / (PPL_pruned − PPL_teacher) against the naive pruned student's
perplexity, so a better block choice or healing counts fully. It prints the table and the budget at
which (2) first reaches (1)'s recovery at the largest budget. Nothing is downloaded from the Hub.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_recover import DistillationConfig, DistillationTrainer, evaluate_perplexity  # noqa: E402
from hf_recover.base.data import prepare_recovery_dataset  # noqa: E402
from hf_recover.base.defaults import load_default_teacher  # noqa: E402
from hf_recover.prune.spec import PruneSpec  # noqa: E402
from hf_recover.recovery import RecoveryCurve, tokens_to_reach  # noqa: E402
from hf_recover.scripts.arguments import (  # noqa: E402
    DataArguments,
    load_text_splits,
    prepare_eval_splits,
)
from hf_recover.scripts.demo import DEMO_DEFAULTS  # noqa: E402

NAIVE_BATCH = 4
NAIVE_ALPHA, NAIVE_TEMPERATURE, NAIVE_LR = 0.5, 2.0, 1e-4
NAIVE_CALIBRATION_BLOCKS = 16


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Smoke run: 2,048 and 4,096 tokens, 4 evaluation blocks.")
    parser.add_argument(
        "--budgets", default=None, help="Comma-separated training-token budgets to evaluate at (15360,30720,61440)."
    )
    parser.add_argument("--eval_blocks", type=int, default=None, help="512-token blocks per split (32).")
    parser.add_argument("--only", choices=("naive", "recommended"), default=None, help="Run one leg only.")
    parser.add_argument("--prune", default=None, help="The recommended leg's prune spec (the demo's by default).")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="Override a recipe field (repeatable)."
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="Skip measuring teacher and pruned perplexity (for exploration runs): TEACHER_VAL,TEACHER_OOD,"
        "PRUNED_VAL,PRUNED_OOD as measured before by this protocol (16.08,38.50,41.36,83.31).",
    )
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    budgets = args.budgets or ("2048,4096" if args.quick else "15360,30720,61440")
    args.budgets = sorted(int(b) for b in budgets.split(","))
    if args.eval_blocks is None:
        args.eval_blocks = 4 if args.quick else 32
    args.overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if not value:
            parser.error(f"--set takes FIELD=VALUE, got {item!r}.")
        args.overrides[name] = _parse_value(value)
    return args


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


class NaiveDistillationTrainer(Trainer):
    """The hand-written baseline: `α·CE + (1 − α)·T²·KL(teacher ‖ student)` on next-token logits."""

    def __init__(self, *args, teacher, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).logits
        valid = inputs["labels"][:, 1:] != -100
        t = NAIVE_TEMPERATURE
        student = F.log_softmax(outputs.logits[:, :-1][valid] / t, dim=-1)
        teacher = F.log_softmax(teacher_logits[:, :-1][valid] / t, dim=-1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="sum") / valid.sum()
        loss = NAIVE_ALPHA * outputs.loss + (1 - NAIVE_ALPHA) * t * t * kl
        return (loss, outputs) if return_outputs else loss


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    data_args = DataArguments(
        max_length=DEMO_DEFAULTS["max_length"],
        max_train_documents=DEMO_DEFAULTS["max_train_documents"],
        eval_blocks=args.eval_blocks,
        calibration_blocks=DEMO_DEFAULTS.get("calibration_blocks", DataArguments.calibration_blocks),
    )
    teacher, tokenizer = load_default_teacher()
    teacher.eval().requires_grad_(False)
    splits = load_text_splits(data_args)
    train = prepare_recovery_dataset(splits["train"], tokenizer, max_length=data_args.max_length)
    calibration = train.select(range(min(data_args.calibration_blocks, len(train))))
    eval_splits = prepare_eval_splits(splits, tokenizer, data_args)

    def evaluate(model) -> dict[str, float]:
        was_training = model.training
        scores = {name: evaluate_perplexity(model, data)["perplexity"] for name, data in eval_splits.items()}
        model.train(was_training)
        return scores

    results = {"budgets": args.budgets}
    # The naive student: the 6 blocks of lowest block influence on 16 calibration blocks (the reference protocol).
    naive_calibration = train.select(range(NAIVE_CALIBRATION_BLOCKS))
    naive_student, naive_config = PruneSpec.parse("importance:6").build(teacher, naive_calibration)
    if args.reference:
        values = [float(v) for v in args.reference.split(",")]
        results["teacher"] = dict(zip(eval_splits, values[:2], strict=True))
        results["pruned"] = dict(zip(eval_splits, values[2:], strict=True))
    else:
        results["teacher"], results["pruned"] = evaluate(teacher), evaluate(naive_student)
    results["naive_removed"] = naive_config.removed_layer_indices
    print(f"teacher {_fmt(results['teacher'])}; pruned {_fmt(results['pruned'])}", flush=True)

    legs = ("naive", "recommended") if args.only is None else (args.only,)
    for leg in legs:
        leg_start = time.perf_counter()
        if leg == "naive":
            student, config = naive_student, None
            tokens_per_step = NAIVE_BATCH * data_args.max_length
            steps = _steps(args.budgets, tokens_per_step)
            training = TrainingArguments(
                output_dir="/tmp/recovery_quality/naive", learning_rate=NAIVE_LR, lr_scheduler_type="constant",
                per_device_train_batch_size=NAIVE_BATCH, **_common_args(steps),
            )  # fmt: skip
            callback = RecoveryCurve(steps, eval_splits)
            trainer = NaiveDistillationTrainer(
                model=student, args=training, train_dataset=train, teacher=teacher, callbacks=[callback]
            )
            student_before = results["pruned"]
        else:
            spec = PruneSpec.parse(args.prune or DEMO_DEFAULTS["prune"])
            student, config = spec.build(teacher, calibration)
            student_before = evaluate(student)
            batch = args.overrides.get(
                "per_device_train_batch_size", DistillationConfig.DEPTH_RECOVERY_RECIPE["per_device_train_batch_size"]
            )
            tokens_per_step = batch * data_args.max_length
            steps = _steps(args.budgets, tokens_per_step)
            recipe = DistillationConfig.for_depth_recovery(
                output_dir="/tmp/recovery_quality/recommended", **{**_common_args(steps), **args.overrides}
            )
            callback = RecoveryCurve(steps, eval_splits)
            trainer = DistillationTrainer(
                model=student, teacher_model=teacher, args=recipe, pruned_config=config, train_dataset=train,
                callbacks=[callback],
            )  # fmt: skip
            results["recommended_prune"] = str(spec)
            results["recommended_removed"] = config.removed_layer_indices
            results["recommended_recipe"] = {
                k: getattr(recipe, k)
                for k in ("alpha", "beta", "gamma", "delta", "temperature", "divergence", "skew_lambda",
                          "learning_rate", "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size")
            }  # fmt: skip
            results["overrides"] = args.overrides
        print(f"{leg}: before training {_fmt(student_before)}", flush=True)
        train_output = trainer.train()
        results[leg] = {0: student_before, **{s * tokens_per_step: ppl for s, ppl in callback.points.items()}}
        results[f"{leg}_seconds"] = time.perf_counter() - leg_start
        results[f"{leg}_train_runtime"] = train_output.metrics["train_runtime"] - callback.seconds  # no evaluations
        for tokens, ppl in results[leg].items():
            print(f"{leg}: {tokens:,} tokens {_fmt(ppl)} {_fmt(_recovery(results, ppl), '%')}", flush=True)

    report = _report(results, legs)
    print("\n" + report)
    results["wall_time"] = time.perf_counter() - start
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def _steps(budgets: list[int], tokens_per_step: int) -> list[int]:
    """The optimizer steps at which each token budget is reached."""
    if any(budget % tokens_per_step for budget in budgets):
        raise ValueError(f"Every budget must be a multiple of {tokens_per_step} tokens (one step), got {budgets}.")
    return [budget // tokens_per_step for budget in budgets]


def _common_args(steps: list[int]) -> dict:
    return dict(
        max_steps=max(steps),
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        seed=42,
        use_cpu=not torch.cuda.is_available(),
    )


def _recovery(results: dict, ppl: dict[str, float]) -> dict[str, float]:
    teacher, pruned = results["teacher"], results["pruned"]
    return {s: 100 * (pruned[s] - ppl[s]) / (pruned[s] - teacher[s]) for s in ppl}


def _fmt(values: dict[str, float], unit: str = "") -> str:
    return ", ".join(f"{k} {v:.2f}{unit}" for k, v in values.items())


def _report(results: dict, legs) -> str:
    splits = list(results["teacher"])
    header = ["recipe", "tokens"] + [f"{s} {c}" for s in splits for c in ("PPL", "recovery")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for leg in legs:
        for tokens, ppl in results[leg].items():
            rec = _recovery(results, ppl)
            cells = [leg, f"{tokens:,}"] + [f"{ppl[s]:.2f} | {rec[s]:.1f}%" for s in splits]
            lines.append("| " + " | ".join(cells) + " |")
    pruned = f"pruned (blocks {results['naive_removed']}) {_fmt(results['pruned'])}"
    text = f"Teacher {_fmt(results['teacher'])}; {pruned}.\n\n" + "\n".join(lines)
    for leg in legs:
        text += f"\n{leg}: training {results[f'{leg}_train_runtime']:.0f} s (evaluations excluded)."
    if set(legs) == {"naive", "recommended"}:
        last = max(results["budgets"])
        goal = _recovery(results, results["naive"][last])
        for split in splits:
            curve = [(tokens, _recovery(results, ppl)[split]) for tokens, ppl in results["recommended"].items()]
            reached = tokens_to_reach(curve, goal[split])
            where = "not within the budgets measured" if reached is None else f"by {reached:,} tokens"
            goal_text = f"{last:,}-token {split} recovery ({goal[split]:.1f}%)"
            text += f"\nRecommended reaches the naive recipe's {goal_text} {where}."
        ratio = results["recommended_train_runtime"] / results["naive_train_runtime"]
        text += f"\nrecommended/naive training time: {ratio:.2f}"
    return text


if __name__ == "__main__":
    main()
