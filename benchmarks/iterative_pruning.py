"""Iterative against one-shot pruning for a deeper cut: prune a little, heal, recover, prune more.

    python benchmarks/iterative_pruning.py                 # 10 of 30 blocks, 2 stages; about 30 minutes on 2 CPU cores
    python benchmarks/iterative_pruning.py --blocks 12 --stages 3
    python benchmarks/iterative_pruning.py --quick         # a smoke run: 2 blocks, 2,048 tokens, 4 evaluation blocks

The protocol is `hf-recover demo`'s (SmolLM2-135M-Instruct, the default corpus and the demo's mixture with the
teacher's answers, `DistillationConfig.for_depth_recovery()`, 61,440 training tokens in all), with a deeper cut:

- one-shot: the `--blocks` contiguous blocks of smallest angular distance removed at once, healed (least squares),
  then recovered on all the tokens;
- iterative: `--stages` stages, each removing its share of the blocks from the student as recovered so far (angular
  distance on that student, healed against it), then recovering on its share of the tokens (the same rows, in the
  same order, as the one-shot run sees them).

Both distil from the unpruned teacher through the composed `PrunedConfig` (its kept blocks give the layer map), and
end with the same number of blocks and parameters. Printed: perplexity on `validation`, `ood` and the held-out
domains, and the assistant on hf_recover's `test` prompts (perplexity of the teacher's answers, top-1 agreement,
repeated 4-grams of the model's own answers), before training (the healed one-shot cut) and after each run, with the
training and healing time of each.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import QUICK_TEACHER_DATA, demo_protocol, recovery_trainer, use_cores  # noqa: E402

from hf_recover.base.chat_retention import chat_reference, load_chat_prompts  # noqa: E402
from hf_recover.base.constants import CHAT_FRACTION  # noqa: E402
from hf_recover.base.evaluation import count_parameters  # noqa: E402
from hf_recover.prune.spec import PruneSpec  # noqa: E402
from hf_recover.recovery import evaluate_assistant, evaluate_splits, teacher_mixture  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=None, help="Blocks removed in all (10).")
    parser.add_argument("--stages", type=int, default=2, help="Stages of the iterative run.")
    parser.add_argument("--tokens", type=int, default=None, help="Training tokens in all (61,440).")
    parser.add_argument("--eval_blocks", type=int, default=None, help="512-token blocks per split (32).")
    parser.add_argument("--chat_fraction", type=float, default=None, help="Share of teacher answers (the demo's).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 2 blocks, 2,048 tokens, 4 blocks.")
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    args.blocks = args.blocks or (2 if args.quick else 10)
    args.tokens = args.tokens or (2048 if args.quick else 61_440)
    args.eval_blocks = args.eval_blocks or (4 if args.quick else 32)
    if args.stages < 2 or args.blocks < args.stages:
        parser.error(f"--stages must be >= 2 and at most --blocks, got {args.stages} stages of {args.blocks} blocks.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    use_cores()
    protocol = demo_protocol(eval_blocks=args.eval_blocks)
    teacher, tokenizer, text, calibration = protocol.teacher, protocol.tokenizer, protocol.text, protocol.calibration
    data_args, eval_splits = protocol.data_args, protocol.eval_splits
    chat = chat_reference(teacher, tokenizer, load_chat_prompts("test")[: 8 if args.quick else None])
    chat_fraction = CHAT_FRACTION if args.chat_fraction is None else args.chat_fraction
    train, _ = teacher_mixture(
        teacher, tokenizer, text, train_tokens=args.tokens, chat_fraction=chat_fraction,
        max_length=data_args.max_length, **(QUICK_TEACHER_DATA if args.quick else {}),
    )  # fmt: skip

    results = {"blocks": args.blocks, "stages": args.stages, "tokens": args.tokens, "runs": {}}
    results["teacher"] = _measure(teacher, "teacher", eval_splits, chat, tokenizer)

    began = time.perf_counter()
    student, config = PruneSpec.parse(f"angular:{args.blocks}:heal=lstsq").build(teacher, calibration)
    heal_seconds = time.perf_counter() - began
    results["one-shot healed"] = _measure(student, "pruned", eval_splits, chat, tokenizer)
    student, seconds = _recover(teacher, tokenizer, student, config, train, "one-shot")
    results["runs"]["one-shot"] = {
        **_measure(student, "recovered", eval_splits, chat, tokenizer), "removed": config.removed_layer_indices,
        "parameters": count_parameters(student), "train_seconds": seconds, "heal_seconds": heal_seconds,
    }  # fmt: skip
    print(f"one-shot: {_line(results['runs']['one-shot'])}", flush=True)

    student, shares = teacher, _shares(args.blocks, args.stages)
    rows = _shares(len(train), args.stages)
    train_seconds = heal_seconds = 0.0
    for stage, ((first, last), (start, stop)) in enumerate(zip(shares, rows)):
        began = time.perf_counter()
        student, config = PruneSpec.parse(f"angular:{last - first}:heal=lstsq").build(student, calibration)
        heal_seconds += time.perf_counter() - began
        student, seconds = _recover(teacher, tokenizer, student, config, train.select(range(start, stop)), stage)
        train_seconds += seconds
    results["runs"]["iterative"] = {
        **_measure(student, "recovered", eval_splits, chat, tokenizer), "removed": config.removed_layer_indices,
        "parameters": count_parameters(student), "train_seconds": train_seconds, "heal_seconds": heal_seconds,
    }  # fmt: skip
    print(f"iterative: {_line(results['runs']['iterative'])}", flush=True)
    print("\n" + _report(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def _shares(total: int, parts: int) -> list[tuple[int, int]]:
    """`[start, stop)` of each of `parts` near-equal consecutive shares of `total`."""
    bounds = [round(total * i / parts) for i in range(parts + 1)]
    return list(zip(bounds, bounds[1:]))


def _recover(teacher, tokenizer, student, pruned_config, train, name) -> tuple[torch.nn.Module, float]:
    trainer = recovery_trainer(teacher, tokenizer, student, pruned_config, train, f"/tmp/iterative_pruning/{name}")
    output = trainer.train()
    return trainer.model, output.metrics["train_runtime"]


def _measure(model, name: str, eval_splits, chat, tokenizer) -> dict:
    perplexity = {split: by_model[name] for split, by_model in evaluate_splits({name: model}, eval_splits).items()}
    assistant = evaluate_assistant({name: model}, chat, tokenizer, answer=name == "recovered")[name]
    return {"perplexity": perplexity, "assistant": assistant.to_dict()}


def _line(figures: dict) -> str:
    prose = ", ".join(f"{split} {ppl:.2f}" for split, ppl in figures["perplexity"].items())
    a = figures["assistant"]
    return f"{prose}; assistant {a['perplexity']:.3f}, top-1 {a['top1_agreement']:.3f}"


def _report(results: dict) -> str:
    splits = list(results["teacher"]["perplexity"])
    teacher_nll = results["teacher"]["assistant"]["nll"]
    cut_nll = results["one-shot healed"]["assistant"]["nll"]
    header = ["model", *(f"{s} PPL" for s in splits), "assistant PPL (log-PPL recovery)", "top-1", "repeated 4-grams"]
    header += ["heal s", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    models = {"teacher": results["teacher"], "one-shot, healed, before training": results["one-shot healed"]}
    models.update(results["runs"])
    for name, figures in models.items():
        a = figures["assistant"]
        rate = a.get("repeated_ngram_rate")
        recovery = 100 * (cut_nll - a["nll"]) / (cut_nll - teacher_nll)
        cells = [name, *(f"{figures['perplexity'][s]:.2f}" for s in splits)]
        cells += [f"{a['perplexity']:.3f} ({recovery:.1f}%)", f"{a['top1_agreement']:.1%}"]
        cells += ["-" if rate is None else f"{rate:.3f}"]
        cells += [f"{figures[k]:.0f}" if k in figures else "" for k in ("heal_seconds", "train_seconds")]
        lines.append("| " + " | ".join(cells) + " |")
    one, it = results["runs"]["one-shot"], results["runs"]["iterative"]
    return (
        f"{results['blocks']} of 30 blocks removed, {results['tokens']:,} training tokens in all; iterative: "
        f"{results['stages']} stages. Removed (teacher blocks): one-shot {one['removed']}, iterative {it['removed']}; "
        f"parameters {one['parameters'] / 1e6:.1f}M / {it['parameters'] / 1e6:.1f}M. The assistant's recovery % is "
        "against the healed one-shot cut.\n\n" + "\n".join(lines)
    )


if __name__ == "__main__":
    main()
