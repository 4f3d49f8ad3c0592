"""Recovery quality: four recipes side by side on prose, held-out prose and the assistant, at equal token budgets.

    python benchmarks/recovery_quality.py                  # the demo's protocol; about an hour on 2 CPU cores
    python benchmarks/recovery_quality.py --only previous mixture   # the teacher data before and after filtering
    python benchmarks/recovery_quality.py --quick          # a smoke run: 2,048 tokens, 4 evaluation blocks, 8 prompts
    python benchmarks/recovery_quality.py --only mixture --set learning_rate=2e-4 --chat_fraction 0.5
    python benchmarks/recovery_quality.py --only text mixture --prune angular:6:heal=local   # another heal
    python benchmarks/recovery_quality.py --only mixture --prompts dev --max_answer_tokens 384   # choose on dev

The protocol is `hf-recover demo`'s: SmolLM2-135M-Instruct (30 blocks) and the default offline corpus (400 training
documents packed into 256-token blocks), 6 blocks removed, 61,440 training tokens for every recipe:

1. `naive`: what a user writes by hand, a plain `transformers.Trainer` subclass with `0.5·CE + 0.5·T²·KL(teacher ‖
   student)`, T = 2, lr 1e-4 constant, batches of 4 × 256 tokens of the corpus, on the student pruned by block
   influence (16 calibration blocks) without healing;
2. `text`: hf_recover's cut and recipe on the corpus alone: the demo's prune spec (`DEMO_DEFAULTS["prune"]`, healed)
   and `DistillationConfig.for_depth_recovery()`;
3. `previous`: the previous demo's mixture: the same cut and recipe, 30% of the tokens the teacher's greedy answers
   (up to 128 tokens, one per prompt, every answer kept: unfinished, refusing and looping ones too);
4. `mixture`: what `hf-recover demo` runs: the same cut and recipe on the demo's mixture of the corpus and the
   teacher's own answers to prompts it wrote itself, sampled and filtered (`hf_recover.recovery.teacher_mixture`;
   the teacher data is built once and cached, its build time printed when it happens).

Every recipe is measured on `validation` and `ood` (the splits recipes were chosen on), on the held-out domains
`git_docs` and `jargon` (never trained on, never looked at while choosing), and as an assistant on hf_recover's
`test` prompts (48 everyday prompts and 40 with verifiable instructions; never trained on, never used to choose):
teacher-forced, the perplexity of the teacher's greedy answers (up to 128 tokens) and its log-perplexity recovery and
top-1 agreement with the teacher's tokens; and by what the model writes itself (greedy): the share of its answers
that finish, that refuse, its repeated 4-grams, tokens per answer (each against the teacher's), the teacher's mean
log-probability of its answer tokens, and IFEval's strict prompt- and instruction-level accuracy on the instruction
prompts (against the teacher's). Prose recovery % is measured against the naive pruned student
(block influence), the assistant's against the demo's cut as made (before healing), so that a better cut or healing
counts fully. Validation and ood are also measured at a quarter and half of each budget, and the script prints the
tokens each recipe needed to reach the naive recipe's final recovery. It also prints the teacher's generation
throughput (its greedy answers, new tokens per second) beside its forward throughput on the same sequences.
Nothing is downloaded from the Hub.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
import torch.nn.functional as F  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import QUICK_TEACHER_DATA, demo_protocol, quiet_run_args, use_cores  # noqa: E402

from hf_recover import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_recover.base.chat_retention import (  # noqa: E402
    PROMPT_SETS,
    answer_prompts,
    chat_reference,
    chat_retention_table,
    evaluate_chat_retention,
    load_chat_prompts,
)
from hf_recover.base.generation import Sampling  # noqa: E402
from hf_recover.base.instruction_following import load_instruction_prompts  # noqa: E402
from hf_recover.distill.answer_filter import GOOD_ANSWERS, KEEP_ALL_ANSWERS  # noqa: E402
from hf_recover.prune.spec import PruneSpec  # noqa: E402
from hf_recover.recovery import (  # noqa: E402
    DEMO_DEFAULTS,
    RecoveryCurve,
    evaluate_assistant,
    evaluate_splits,
    teacher_mixture,
    tokens_to_reach,
)

RECIPES = ("naive", "text", "previous", "mixture")
PREVIOUS_MIXTURE = {
    "chat_fraction": 0.3, "num_prompts": 256, "answer_tokens": 128, "answers_per_prompt": 1,
    "answer_sampling": Sampling(max_new_tokens=128), "answer_filter": KEEP_ALL_ANSWERS,
}  # fmt: skip
"""The previous demo's teacher data: greedy answers up to 128 tokens, one to each of 256 prompts, none filtered out
(`--chat_fraction` does not apply to it)."""
TUNING_SPLITS = ("validation", "ood")
NAIVE_BATCH = 4
NAIVE_ALPHA, NAIVE_TEMPERATURE, NAIVE_LR = 0.5, 2.0, 1e-4
NAIVE_CALIBRATION_BLOCKS = 16


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Smoke run: 2,048 tokens, 4 blocks, 8 prompts.")
    parser.add_argument("--tokens", type=int, default=None, help="Training tokens of every recipe (61,440).")
    parser.add_argument("--eval_blocks", type=int, default=None, help="512-token blocks per split (32).")
    parser.add_argument("--only", nargs="+", choices=RECIPES, default=list(RECIPES), help="Recipes to run.")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="Override a field of the hf_recover recipes."
    )
    parser.add_argument("--chat_fraction", type=float, default=None, help="The mixture's share of teacher answers.")
    parser.add_argument(
        "--num_prompts", type=int, default=None, help="Prompts of the mixture's teacher data (NUM_PROMPTS)."
    )
    parser.add_argument(
        "--max_answer_tokens",
        type=int,
        default=None,
        help="Train only on the teacher's good answers of at most this many tokens (GOOD_ANSWERS' own cap).",
    )
    parser.add_argument(
        "--prompts",
        choices=PROMPT_SETS,
        default="test",
        help="The assistant's prompts: 'dev' to choose a recipe, 'test' (the default) to report it.",
    )
    parser.add_argument(
        "--prune",
        default=DEMO_DEFAULTS["prune"],
        help="The hf_recover recipes' cut, e.g. angular:6:heal=local.",
    )
    parser.add_argument(
        "--on_policy_steps",
        type=int,
        nargs="+",
        default=[],
        help="After the mixture, DistillationConfig.for_on_policy_phase() from its warm start, measured after each "
        "of these step counts, increasing (one more row each, `mixture + on-policy N`; one run continued).",
    )
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (2048 if args.quick else 61_440)
    args.eval_blocks = args.eval_blocks or (4 if args.quick else 32)
    steps = args.on_policy_steps
    if any(n < 1 for n in steps) or steps != sorted(set(steps)):
        parser.error(f"--on_policy_steps takes increasing positive step counts, got {steps}.")
    if steps and "mixture" not in args.only:
        parser.error("--on_policy_steps continues the mixture: add mixture to --only.")
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
            teacher_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            teacher_logits = self.teacher(**teacher_inputs).logits
        valid = inputs["labels"][:, 1:] != -100
        t = NAIVE_TEMPERATURE
        student = F.log_softmax(outputs.logits[:, :-1][valid] / t, dim=-1)
        teacher = F.log_softmax(teacher_logits[:, :-1][valid] / t, dim=-1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="sum") / valid.sum()
        loss = NAIVE_ALPHA * outputs.loss + (1 - NAIVE_ALPHA) * t * t * kl
        return (loss, outputs) if return_outputs else loss


def mixture_settings(args) -> dict:
    """The demo's mixture (`teacher_mixture`'s defaults, which the demo uses) with this run's `--chat_fraction`,
    `--num_prompts` and `--max_answer_tokens`."""
    settings = {} if args.chat_fraction is None else {"chat_fraction": args.chat_fraction}
    if args.num_prompts is not None:
        settings["num_prompts"] = args.num_prompts
    if args.max_answer_tokens is not None:
        settings["answer_filter"] = dataclasses.replace(GOOD_ANSWERS, max_answer_tokens=args.max_answer_tokens)
    if args.quick:  # a small teacher data of its own
        settings.update(QUICK_TEACHER_DATA)
    return settings


def main(argv=None) -> dict:
    args = parse_args(argv)
    use_cores()
    start = time.perf_counter()
    protocol = demo_protocol(eval_blocks=args.eval_blocks)
    teacher, tokenizer, text, calibration = protocol.teacher, protocol.tokenizer, protocol.text, protocol.calibration
    data_args, eval_splits = protocol.data_args, protocol.eval_splits
    tuning = {split: eval_splits[split] for split in TUNING_SPLITS}
    prompts = load_chat_prompts(args.prompts)[: 8 if args.quick else None]
    instructions = load_instruction_prompts(args.prompts)[: 8 if args.quick else None]

    results = {"tokens": args.tokens, "recipes": {}}
    chat, results["throughput"] = _reference_and_throughput(teacher, tokenizer, prompts, instructions)
    print(_throughput_line(results["throughput"]), flush=True)

    naive_student, naive_config = PruneSpec.parse("importance:6").build(
        teacher, text.select(range(NAIVE_CALIBRATION_BLOCKS))
    )
    spec = PruneSpec.parse(args.prune)
    block_scores = {}
    cut = spec.without_healing().build(teacher, calibration, block_scores=block_scores)[0]
    began = time.perf_counter()
    healed, healed_config = spec.build(teacher, calibration, block_scores=block_scores)
    results["heal_seconds"] = time.perf_counter() - began
    starts = {"teacher": teacher, "pruned": naive_student, "cut": cut, "healed": healed}
    results["before"] = evaluate_splits(starts, eval_splits, cache=True)
    # the cut answers every prompt itself (the untrained start); the others are scored teacher-forced only
    answering = {name: model for name, model in starts.items() if name in ("teacher", "cut")}
    scores = {
        name: score
        for name, model in starts.items()
        if name not in answering
        for score in [evaluate_assistant({name: model}, chat, tokenizer, answer=0)[name]]
    }
    scores.update(evaluate_assistant(answering, chat, tokenizer))
    results["assistant_before"] = chat_retention_table(scores)
    results["naive_removed"] = naive_config.removed_layer_indices
    results["removed"] = healed_config.removed_layer_indices
    results["prune"] = str(spec)

    for recipe in args.only:
        recipe_start = time.perf_counter()
        # each hf_recover recipe starts from its own copy of the same healed cut
        student = naive_student if recipe == "naive" else copy.deepcopy(healed)
        trainer, curve, extra = _trainer(recipe, args, data_args, teacher, tokenizer, student, healed_config, text)
        curve.eval_splits = tuning
        output = trainer.train()
        model = trainer.model
        results["recipes"][recipe] = {
            **_measured(model, teacher, tokenizer, chat, eval_splits, recipe),
            "curve": {curve.tokens[step]: point for step, point in sorted(curve.points.items())},
            "train_tokens": int(trainer.state.num_input_tokens_seen),
            "train_runtime": output.metrics["train_runtime"] - curve.seconds,  # evaluations excluded
            "seconds": time.perf_counter() - recipe_start,
            **extra,
        }
        print(f"{recipe}: {_summary(results, recipe)}", flush=True)
        if recipe == "mixture":  # a second phase from this warm start, measured after each step count
            _on_policy_phase(args, results, model, teacher, tokenizer, trainer.train_dataset, chat, eval_splits)

    report = _report(results, chat)
    print("\n" + report)
    results["wall_time"] = time.perf_counter() - start
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def _on_policy_phase(args, results, model, teacher, tokenizer, mixture, chat, eval_splits) -> None:
    """`DistillationConfig.for_on_policy_phase()` on the mixture's chat rows, continued to each of
    `--on_policy_steps` in turn (one run: the row at 80 steps is the row at 20 trained 60 more)."""
    chat_rows = mixture.filter(lambda n: n > 0, input_columns="prompt_length")
    done, tokens, runtime = (
        0,
        results["recipes"]["mixture"]["train_tokens"],
        results["recipes"]["mixture"]["train_runtime"],
    )
    for steps in args.on_policy_steps:
        phase_start, name = time.perf_counter(), f"mixture + on-policy {steps}"
        phase_args = DistillationConfig.for_on_policy_phase(
            output_dir="/tmp/recovery_quality/on-policy", max_steps=steps - done,
            include_num_input_tokens_seen="non_padding", **{**quiet_run_args(), "seed": 42 + done},
        )  # fmt: skip
        phase = DistillationTrainer(
            model=model, teacher_model=teacher, args=phase_args, train_dataset=chat_rows, processing_class=tokenizer
        )
        runtime += phase.train().metrics["train_runtime"]
        tokens += int(phase.state.num_input_tokens_seen)
        results["recipes"][name] = {
            **_measured(model, teacher, tokenizer, chat, eval_splits, name),
            "curve": {}, "train_tokens": tokens, "train_runtime": runtime,
            "seconds": time.perf_counter() - phase_start, "chat_rows": len(chat_rows),
        }  # fmt: skip
        print(f"{name}: {_summary(results, name)}", flush=True)
        done = steps


def _measured(model, teacher, tokenizer, chat, eval_splits, name: str) -> dict:
    """A trained model's perplexity on every split, its assistant figures against the teacher's, and its first
    answers."""
    after = evaluate_splits({"recovered": model}, eval_splits)
    assistant = evaluate_chat_retention(model, tokenizer=tokenizer, reference=chat, scorer=teacher)
    return {
        "perplexity": {split: by_model["recovered"] for split, by_model in after.items()},
        "assistant": chat_retention_table({"teacher": chat.teacher, name: assistant})[name],
        "answers": [tokenizer.decode(a, skip_special_tokens=True).strip() for a in assistant.answers[:6]],
        "instruction_answers": [
            tokenizer.decode(a, skip_special_tokens=True).strip() for a in assistant.instruction_answers[:6]
        ],
    }


def _reference_and_throughput(teacher, tokenizer, prompts, instructions):
    """The teacher's greedy answers, and the teacher timed on them: generating them again (new tokens per second),
    and one teacher-forced forward over the same sequences (tokens per second)."""
    chat = chat_reference(teacher, tokenizer, prompts, instructions=instructions)
    began = time.perf_counter()
    answers = answer_prompts(teacher, tokenizer, chat)
    generation_seconds = time.perf_counter() - began
    began = time.perf_counter()
    evaluate_chat_retention(teacher, tokenizer=tokenizer, reference=chat, answer=False)
    forward_seconds = time.perf_counter() - began
    generated = sum(len(answer) for answer in answers)
    forwarded = sum(len(p) + len(a) for p, a in zip(chat.prompt_ids, chat.answer_ids) if a)
    return chat, {
        "generated_tokens": generated,
        "generation_tokens_per_second": generated / generation_seconds,
        "forward_tokens": forwarded,
        "forward_tokens_per_second": forwarded / forward_seconds,
    }


def _throughput_line(figures: dict) -> str:
    ratio = figures["forward_tokens_per_second"] / figures["generation_tokens_per_second"]
    return (
        f"teacher generation: {figures['generation_tokens_per_second']:.0f} new tokens/s "
        f"({figures['generated_tokens']:,} tokens, greedy, batched, KV cache); teacher forward on the same sequences: "
        f"{figures['forward_tokens_per_second']:.0f} tokens/s ({ratio:.0f}x)"
    )


def _trainer(recipe, args, data_args, teacher, tokenizer, student, pruned_config, text):
    """The trainer of one recipe, its recovery curve (at a quarter and half of its steps; the caller sets its
    splits), and what the results should record about it. Text-only recipes draw their steps from the whole corpus in
    the Trainer's seeded order, as the demo did; the mixture is `args.tokens` tokens, once through."""
    if recipe == "naive":
        steps = math.ceil(args.tokens / (NAIVE_BATCH * data_args.max_length))
        curve = RecoveryCurve([steps // 4, steps // 2], {})
        training = TrainingArguments(
            output_dir="/tmp/recovery_quality/naive", learning_rate=NAIVE_LR, lr_scheduler_type="constant",
            per_device_train_batch_size=NAIVE_BATCH, max_steps=steps, include_num_input_tokens_seen="non_padding",
            **quiet_run_args(),
        )  # fmt: skip
        trainer = NaiveDistillationTrainer(
            model=student, args=training, train_dataset=text, teacher=teacher, callbacks=[curve]
        )
        return trainer, curve, {}
    config = DistillationConfig.for_depth_recovery(
        output_dir=f"/tmp/recovery_quality/{recipe}", include_num_input_tokens_seen="non_padding",
        **{**quiet_run_args(), **args.overrides},
    )  # fmt: skip
    rows_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    extra = {"recipe": {k: getattr(config, k) for k in ("alpha", "beta", "gamma", "delta", "learning_rate")}}
    train = text
    config.max_steps = math.ceil(args.tokens / (rows_per_step * data_args.max_length))
    if recipe in ("previous", "mixture"):
        settings = PREVIOUS_MIXTURE if recipe == "previous" else mixture_settings(args)
        began = time.perf_counter()
        train, folder = teacher_mixture(teacher, tokenizer, text, train_tokens=args.tokens, **settings)
        extra.update(mixture=settings, teacher_data=str(folder), mixture_seconds=time.perf_counter() - began)
        config.max_steps = math.ceil(len(train) / rows_per_step)
    curve = RecoveryCurve([config.max_steps // 4, config.max_steps // 2], {})
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, pruned_config=pruned_config, train_dataset=train,
        processing_class=tokenizer, callbacks=[curve],
    )  # fmt: skip
    return trainer, curve, extra


def _prose_recovery(results: dict, split: str, ppl: float) -> float:
    """Recovery % against the naive pruned student (block influence)."""
    teacher, pruned = results["before"][split]["teacher"], results["before"][split]["pruned"]
    return 100 * (pruned - ppl) / (pruned - teacher)


def _assistant_recovery(results: dict, nll: float) -> float:
    """Log-perplexity recovery % of the teacher's answers against the demo's cut as made."""
    teacher, cut = results["assistant_before"]["teacher"]["nll"], results["assistant_before"]["cut"]["nll"]
    return 100 * (cut - nll) / (cut - teacher)


def _summary(results: dict, recipe: str) -> str:
    figures = results["recipes"][recipe]
    prose = ", ".join(f"{split} {ppl:.2f}" for split, ppl in figures["perplexity"].items())
    a = figures["assistant"]
    return (
        f"{prose}; assistant {a['perplexity']:.3f} ({_assistant_recovery(results, a['nll']):.1f}%), top-1 "
        f"{a['top1_agreement']:.3f}; {figures['train_tokens']:,} tokens in {figures['train_runtime']:.0f} s"
    )


def _report(results: dict, chat) -> str:
    splits = list(results["before"])
    header = [
        "model", *(f"{s} PPL" for s in splits), "assistant PPL", "top-1", "finished", "refusals", "repeated 4-grams",
        "tokens per answer", "teacher log-prob", "instructions: prompts", "instructions: each", "train s",
    ]  # fmt: skip
    rows = []

    def ratio(assistant: dict, figure: str, ratio_name: str, form: str) -> str:
        value, times = assistant.get(figure), assistant.get(ratio_name)
        if value is None:
            return "-"
        return format(value, form) + ("" if times is None else f" ({times:.2f}x)")

    def row(name, ppl: dict, assistant: dict, seconds=None):
        cells = [name]
        for split in splits:
            cell = f"{ppl[split]:.2f}"
            if split in TUNING_SPLITS and name != "teacher":
                cell += f" ({_prose_recovery(results, split, ppl[split]):.1f}%)"
            cells.append(cell)
        recovery = "" if name == "teacher" else f" ({_assistant_recovery(results, assistant['nll']):.1f}%)"
        logprob = assistant.get("teacher_logprob")
        cells += [
            f"{assistant['perplexity']:.3f}{recovery}",
            f"{assistant['top1_agreement']:.1%}",
            ratio(assistant, "finish_rate", "finish_ratio", ".1%"),
            ratio(assistant, "refusal_rate", "", ".1%"),
            ratio(assistant, "repeated_ngram_rate", "repetition_ratio", ".3f"),
            ratio(assistant, "mean_length", "length_ratio", ".0f"),
            "-" if logprob is None else f"{logprob:.2f}",
            ratio(assistant, "instruction_prompt_accuracy", "instruction_prompt_ratio", ".1%"),
            ratio(assistant, "instruction_accuracy", "instruction_ratio", ".1%"),
            "" if seconds is None else f"{seconds:.0f}",
        ]
        rows.append(cells)

    before = results["before"]
    for name in ("teacher", "pruned", "cut", "healed"):
        row(name, {s: before[s][name] for s in splits}, results["assistant_before"][name])
    for recipe, figures in results["recipes"].items():
        row(recipe, figures["perplexity"], figures["assistant"], figures["train_runtime"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    text = (
        f"{results['tokens']:,} training tokens per recipe. pruned: block influence's blocks "
        f"{results['naive_removed']} (prose recovery % is against it); cut: `{results['prune']}` before healing, "
        f"blocks {results['removed']} (the assistant's log-perplexity recovery % is against it); healed: that cut "
        f"healed ({results['heal_seconds']:.0f} s, scoring included), where `text`, `previous` and `mixture` start. "
        f"Assistant: {len(chat.prompts)} test prompts and {len(chat.instructions)} instruction prompts, greedy; "
        "ratios are against the teacher's.\n\n" + "\n".join(lines)
    )
    naive = results["recipes"].get("naive")
    for split in TUNING_SPLITS if naive else ():
        goal = _prose_recovery(results, split, naive["perplexity"][split])
        for recipe, figures in results["recipes"].items():
            if recipe == "naive":
                continue
            curve = [(0, _prose_recovery(results, split, results["before"][split]["healed"]))]
            curve += [(t, _prose_recovery(results, split, p[split])) for t, p in figures["curve"].items()]
            curve.append((figures["train_tokens"], _prose_recovery(results, split, figures["perplexity"][split])))
            reached = tokens_to_reach(curve, goal)
            where = "not within its budget" if reached is None else f"by {reached:,} tokens"
            text += f"\n{recipe} reaches the naive recipe's final {split} recovery ({goal:.1f}%) {where}."
    for recipe in ("previous", "mixture"):
        if results["recipes"].get(recipe, {}).get("mixture_seconds", 0) > 60:
            seconds = results["recipes"][recipe]["mixture_seconds"]
            text += f"\n{recipe}'s teacher data was built in this run: {seconds:.0f} s."
    return text + "\n" + _throughput_line(results["throughput"])


if __name__ == "__main__":
    main()
