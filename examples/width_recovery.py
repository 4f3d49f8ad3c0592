"""Width pruning, then recovery by distillation with a 1:1 layer map.

1. `prune_width` removes the least important GLU MLP neurons of every block (MAW by default: the weight
   magnitudes of each neuron's gate and up rows). The student keeps all of the teacher's blocks, so
2. the layer map is 1:1: `layer_map="kept"` reads it from the `PrunedConfig` (for width-only pruning the
   kept blocks are all of them, so student block i imitates teacher block i). `layer_map="uniform"`
   (`i * n_teacher // n_student`) gives the same map here, since both models have the same depth; it is
   what you would use for a student that was not pruned by hf_recover.
3. `DistillationTrainer` trains with `alpha·CE + beta·T²·KD + gamma·align`: the alignment term compares each
   student block's output with its mapped teacher block's. Width pruning leaves the hidden size alone, so
   with `projector="auto"` (the default) no projector is built and hidden states are compared directly;
   projectors are built automatically when the hidden sizes differ. `--projector linear` always adds a
   learnable student -> teacher linear map per block (initialised to the identity), and
   `--save_projectors` writes them next to the model.
4. The recovered model is saved (weights, tokenizer, `pruned_config.json`, model card) and reloaded with
   `hf_recover.load_pruned`, which rebuilds per-block MLP sizes when they differ (`--layers` prunes only
   some blocks); uniform students also reload with plain `AutoModelForCausalLM.from_pretrained`.

Usage (defaults: the embedded SmolLM2-135M-Instruct teacher and the embedded offline corpus; the default 20 steps
of 4 x 256 tokens take a few minutes on 2 CPU cores):

    python examples/width_recovery.py --output_dir out/width --max_steps 20
    python examples/width_recovery.py --output_dir out/width --pruning_ratio 0.5 --method vow --layer_map uniform \\
        --projector linear --save_projectors --overwrite
    python examples/width_recovery.py --teacher_name_or_path path/to/model --dataset my_texts/ --output_dir out/w
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, default_data_collator

import hf_recover
from hf_recover import DistillationConfig, DistillationTrainer


@dataclass
class WidthRecoveryArguments:
    output_dir: str = field(metadata={"help": "Where the recovered model is written."})
    teacher_name_or_path: str = field(
        default="default",
        metadata={"help": "The model to prune and distil from: 'default' (embedded SmolLM2-135M-Instruct), a folder."},
    )
    student_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An already width-pruned student folder (with pruned_config.json); skips pruning."},
    )
    pruning_ratio: float = field(default=0.25, metadata={"help": "Fraction of each block's MLP neurons removed."})
    method: str = field(default="maw", metadata={"help": "Neuron importance: maw, vow, pon or activation."})
    layers: list[int] | None = field(
        default=None, metadata={"help": "Prune only these blocks (the others keep their MLP size). Default: all."}
    )
    dataset: list[str] = field(
        default_factory=lambda: ["default"],
        metadata={"help": "Recovery text: 'default' or local .txt/.json/.jsonl/.parquet files or folders."},
    )
    max_length: int = field(default=256, metadata={"help": "Tokens per packed block."})
    eval_blocks: int = field(default=8, metadata={"help": "Held-out blocks for the before/after perplexity."})
    max_steps: int = field(default=20, metadata={"help": "Optimizer steps: the recovery budget."})
    batch_size: int = field(default=4, metadata={"help": "Blocks per step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the cross-entropy on the labels."})
    beta: float = field(default=0.5, metadata={"help": "Weight of the logit KD (times temperature²)."})
    gamma: float = field(default=1.0, metadata={"help": "Weight of the hidden-state alignment over the layer map."})
    layer_map: str = field(default="kept", metadata={"help": "kept (1:1 from the PrunedConfig), uniform, last."})
    projector: str = field(default="auto", metadata={"help": "auto (only if hidden sizes differ), linear, none."})
    save_projectors: bool = field(default=False, metadata={"help": "Write projectors.safetensors with the model."})
    seed: int = field(default=0, metadata={"help": "Seed for data shuffling and training."})
    overwrite: bool = field(default=False, metadata={"help": "Write into an existing non-empty output folder."})


def main(argv: list[str] | None = None) -> dict:
    """Prune (unless a student is given), recover, save, reload; return a summary (see the end)."""
    (args,) = HfArgumentParser(WidthRecoveryArguments).parse_args_into_dataclasses(args=argv)
    output_dir = Path(args.output_dir)
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite):
        raise ValueError(f"{output_dir} exists and is not an empty folder; pass --overwrite to write into it anyway.")
    for path in (args.teacher_name_or_path, args.student_name_or_path):
        if path not in (None, "default") and path.startswith((".", "/", "~")) and not Path(path).exists():
            raise FileNotFoundError(f"No such model folder: {path}.")
    start = time.perf_counter()
    # Built first: it checks the loss weights, layer map and projector kind before any model is loaded.
    config = DistillationConfig(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        alpha=args.alpha,
        beta=args.beta,
        gamma=args.gamma,
        layer_map=args.layer_map,
        projector=args.projector,
        save_projectors=args.save_projectors,
    )

    # -- teacher and student ----------------------------------------------------------------------------------
    if args.teacher_name_or_path == "default":
        teacher, tokenizer = hf_recover.load_default_teacher()
    else:
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher_name_or_path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.teacher_name_or_path)
    text = hf_recover.load_recovery_data(args.dataset, seed=args.seed)
    split = text.train_test_split(test_size=max(1, len(text) // 20), seed=args.seed)
    train_data = hf_recover.prepare_recovery_dataset(split["train"], tokenizer, max_length=args.max_length)
    held_out = hf_recover.prepare_recovery_dataset(split["test"], tokenizer, max_length=args.max_length)
    held_out = held_out.select(range(min(args.eval_blocks, len(held_out))))

    if args.student_name_or_path is None:
        calibration = train_data.select(range(min(16, len(train_data)))) if args.method == "activation" else None
        student, pruned_config = hf_recover.prune_width(
            teacher, pruning_ratio=args.pruning_ratio, method=args.method, layers=args.layers, data=calibration
        )
    else:
        student = hf_recover.load_pruned(args.student_name_or_path)  # per-block MLP sizes, pruned_config attached
        pruned_config = hf_recover.PrunedConfig.find_for(student)
    student.requires_grad_(True)
    sizes = [block.mlp.down_proj.in_features for block in student.model.layers]
    print(f"MLP sizes: teacher {teacher.config.intermediate_size}, student {sizes}")

    before = {
        "teacher": hf_recover.evaluate_perplexity(teacher, held_out)["perplexity"],
        "pruned": hf_recover.evaluate_perplexity(student, held_out)["perplexity"],
    }

    # -- recovery -----------------------------------------------------------------------------------------------
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        pruned_config=pruned_config,
        train_dataset=train_data,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    n_projectors = 0 if trainer.projectors is None else len(trainer.projectors)
    print(f"layer map (student block -> teacher block): {trainer.layer_map}; projectors: {n_projectors}")
    trainer.train()

    recovered = trainer.model
    after = hf_recover.evaluate_perplexity(recovered, held_out)["perplexity"]
    metrics = hf_recover.recovery_metrics(before["teacher"], before["pruned"], after)
    parameters = {
        name: sum(p.numel() for p in model.parameters())
        for name, model in (("teacher", teacher), ("student", recovered))
    }
    trainer.model_card_metrics = {  # the schema of hf_recover.generate_model_card
        "perplexity": {"held-out": {**before, "recovered": after}},
        "train_steps": trainer.state.global_step,
        "train_tokens": trainer.state.global_step * args.batch_size * args.max_length,
        "teacher_parameters": parameters["teacher"],
        "student_parameters": parameters["student"],
    }
    trainer.model_card_datasets = args.dataset
    trainer.save_model()  # weights + tokenizer + pruned_config.json + README.md model card

    # -- reload with the loader that knows per-block MLP sizes, and check it is the same model --------------------
    reloaded = hf_recover.load_pruned(output_dir).eval()
    sample = torch.tensor(held_out[0]["input_ids"][:32])[None].to(recovered.device)
    with torch.no_grad():
        reload_error = (reloaded.to(recovered.device)(sample).logits - recovered.eval()(sample).logits).abs().max()

    summary = {
        "output_dir": str(output_dir),
        "student_mlp_sizes": sizes,
        "layer_map": trainer.layer_map,
        "projectors": n_projectors,
        "perplexity": {**before, "recovered": after},
        **metrics,
        "parameters": parameters,
        "reload_max_abs_logit_diff": float(reload_error),
        "wall_time_s": time.perf_counter() - start,
        "trainer": trainer,
    }
    print(
        f"perplexity on {len(held_out)} held-out blocks: teacher {before['teacher']:.2f}, pruned "
        f"{before['pruned']:.2f}, recovered {after:.2f} (recovery {metrics['recovery']:.1%}); reloaded from "
        f"{output_dir}, max |logit diff| {float(reload_error):.2e}; {summary['wall_time_s']:.0f} s"
    )
    return summary


if __name__ == "__main__":
    main()
