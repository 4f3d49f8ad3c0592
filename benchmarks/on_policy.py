"""Does on-policy distillation pay at the demo's budget, and whose: hf_recover's `lmbda` or TRL's trainer?

    python benchmarks/on_policy.py                      # about 40 minutes on 2 CPU cores
    python benchmarks/on_policy.py --lmbda 0.5 --only off-policy lmbda
    python benchmarks/on_policy.py --quick              # a smoke run: 2,048 tokens, 4 evaluation blocks, 8 prompts

The protocol is `hf-recover demo`'s: the healed cut (`DEMO_DEFAULTS["prune"]`), `DistillationConfig.
for_depth_recovery()` and the demo's mixture of the corpus and the teacher's answers (61,440 tokens), three ways:

1. `off-policy`: the mixture as it is (the demo);
2. `lmbda`: the same rows through hf_recover's trainer with `lmbda` (GKD's share of on-policy batches): on those
   batches the student answers the batch's prompts itself (sampled, up to 128 tokens) and learns the teacher's
   distribution on its own answers;
3. `trl`: off-policy with hf_recover on the first `1 − lmbda` of the rows, then TRL's `DistillationTrainer`
   (on-policy only: the student's completions scored by the teacher, generalized JSD with TRL's `beta`) on the
   prompts of the chat rows that remain, 4 prompts a step, completions of up to 128 tokens.

Each is measured on `validation` and `ood` and as an assistant on hf_recover's 48 `test` prompts (perplexity of the
teacher's greedy answers, log-perplexity recovery against the demo's cut as made, top-1 agreement, repeated 4-grams
of the model's own greedy answers), with its training time: the table says whether on-policy buys more assistant per
second than the off-policy mixture. Run it alone on the machine: the times are compared.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
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

from hf_recover import DistillationConfig  # noqa: E402
from hf_recover.base.chat_retention import chat_reference, load_chat_prompts  # noqa: E402
from hf_recover.base.constants import CHAT_FRACTION  # noqa: E402
from hf_recover.prune.spec import PruneSpec  # noqa: E402
from hf_recover.recovery import DEMO_DEFAULTS, evaluate_assistant, evaluate_splits, teacher_mixture  # noqa: E402

LEGS = ("off-policy", "lmbda", "trl")
TRL_PROMPTS_PER_STEP = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lmbda", type=float, default=0.25, help="Share of on-policy batches (and TRL's share).")
    parser.add_argument("--trl_beta", type=float, default=1.0, help="TRL's JSD interpolation (1: reverse KL).")
    parser.add_argument("--only", nargs="+", choices=LEGS, default=list(LEGS), help="Legs to run.")
    parser.add_argument("--tokens", type=int, default=None, help="Training tokens of the mixture (61,440).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 2,048 tokens, 4 blocks, 8 prompts.")
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (2048 if args.quick else 61_440)
    if not 0 < args.lmbda < 1:
        parser.error(f"--lmbda must lie in (0, 1), got {args.lmbda}.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    use_cores()
    protocol = demo_protocol(eval_blocks=4 if args.quick else 32, held_out=False)
    teacher, tokenizer, text, calibration = protocol.teacher, protocol.tokenizer, protocol.text, protocol.calibration
    data_args, eval_splits = protocol.data_args, protocol.eval_splits
    chat = chat_reference(teacher, tokenizer, load_chat_prompts("test")[: 8 if args.quick else None])
    train, _ = teacher_mixture(
        teacher, tokenizer, text, train_tokens=args.tokens, chat_fraction=CHAT_FRACTION,
        max_length=data_args.max_length, **(QUICK_TEACHER_DATA if args.quick else {}),
    )  # fmt: skip
    spec = PruneSpec.parse(DEMO_DEFAULTS["prune"])
    scores = {}
    cut = spec.without_healing().build(teacher, calibration, block_scores=scores)[0]
    healed, pruned_config = spec.build(teacher, calibration, block_scores=scores)
    results = {"lmbda": args.lmbda, "tokens": args.tokens, "legs": {}}
    results["before"] = {
        name: _measure(model, eval_splits, chat, tokenizer, answer=False)
        for name, model in {"teacher": teacher, "cut": cut, "healed": healed}.items()
    }
    for leg in args.only:
        student = copy.deepcopy(healed)
        began = time.perf_counter()
        if leg == "trl":
            first = round(len(train) * (1 - args.lmbda))
            student = _ours(teacher, tokenizer, student, pruned_config, train.select(range(first)), 0.0, leg)
            student, steps = _trl(teacher, tokenizer, student, train.select(range(first, len(train))), args)
            extra = {"trl_steps": steps}
        else:
            lmbda = args.lmbda if leg == "lmbda" else 0.0
            student, extra = _ours(teacher, tokenizer, student, pruned_config, train, lmbda, leg), {}
        seconds = time.perf_counter() - began
        results["legs"][leg] = {**_measure(student, eval_splits, chat, tokenizer), "seconds": seconds, **extra}
        print(f"{leg}: {json.dumps(results['legs'][leg], default=_plain)}", flush=True)
    print("\n" + _report(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=_plain) + "\n")
    return results


def _ours(teacher, tokenizer, student, pruned_config, train, lmbda: float, name: str):
    trainer = recovery_trainer(
        teacher, tokenizer, student, pruned_config, train, f"/tmp/on_policy/{name}", lmbda=lmbda
    )
    trainer.train()
    return trainer.model


def _trl(teacher, tokenizer, student, rows, args):
    """TRL's on-policy `DistillationTrainer` on the prompts of the chat rows in `rows` (conversational prompts)."""
    import trl
    from datasets import Dataset

    prompt_ids = [ids[:n] for ids, n in zip(rows["input_ids"], rows["prompt_length"]) if n > 0]
    if not prompt_ids:
        raise ValueError("The rows TRL would train on hold no chat prompt: raise --lmbda or the chat fraction.")
    prompts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompt_ids]
    steps = math.ceil(len(prompts) / TRL_PROMPTS_PER_STEP)
    config = trl.DistillationConfig(
        output_dir="/tmp/on_policy/trl", max_steps=steps, per_device_train_batch_size=TRL_PROMPTS_PER_STEP,
        learning_rate=DistillationConfig.DEPTH_RECOVERY_RECIPE["learning_rate"], lr_scheduler_type="constant",
        beta=args.trl_beta, temperature=1.0, max_completion_length=128, logging_steps=5, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=42, use_cpu=not torch.cuda.is_available(), bf16=False,
    )  # fmt: skip
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation pads on the left
    try:
        trainer = trl.DistillationTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
        )  # fmt: skip
        trainer.train()
    finally:
        tokenizer.padding_side = side
    return trainer.model, steps


def _measure(model, eval_splits, chat, tokenizer, answer: bool = True) -> dict:
    perplexity = {split: by_model["m"] for split, by_model in evaluate_splits({"m": model}, eval_splits).items()}
    assistant = evaluate_assistant({"m": model}, chat, tokenizer, answer=answer)["m"]
    return {"perplexity": perplexity, "assistant": assistant}


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else str(value)


def _report(results: dict) -> str:
    before = results["before"]
    teacher_nll, cut_nll = before["teacher"]["assistant"].nll, before["cut"]["assistant"].nll
    splits = list(before["teacher"]["perplexity"])
    header = ["leg", *(f"{s} PPL" for s in splits), "assistant PPL (log-PPL recovery)", "top-1", "repeated 4-grams"]
    header += ["seconds"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, figures in {**before, **results["legs"]}.items():
        a = figures["assistant"]
        recovery = 100 * (cut_nll - a.nll) / (cut_nll - teacher_nll)
        rate = "-" if a.repeated_ngram_rate is None else f"{a.repeated_ngram_rate:.3f}"
        cells = [name, *(f"{figures['perplexity'][s]:.2f}" for s in splits)]
        cells += [f"{a.perplexity:.3f} ({recovery:.1f}%)", f"{a.top1_agreement:.1%}", rate]
        cells.append(f"{figures['seconds']:.0f}" if "seconds" in figures else "")
        lines.append("| " + " | ".join(cells) + " |")
    return (
        f"{results['tokens']:,} tokens of the demo's mixture; on-policy share {results['lmbda']}; the assistant's "
        "recovery % is against the demo's cut as made.\n\n" + "\n".join(lines)
    )


if __name__ == "__main__":
    main()
