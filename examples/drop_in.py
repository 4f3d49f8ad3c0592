"""Recover a pruned model with an ordinary Hugging Face fine-tuning script: hf_recover is a drop-in `Trainer`.

This is a plain causal-LM fine-tuning script (datasets -> tokenized blocks -> `TrainingArguments` -> `Trainer`).
Turning it into distillation-based recovery changes the import, the two class names, and adds the teacher;
every changed line is marked `# hf_recover: import`, `class name` or `+ teacher`. The plain version differs by
exactly this (comments left out):

    -from transformers import TrainingArguments, Trainer
    +from hf_recover import DistillationConfig, DistillationTrainer
    +TEACHER_HELP = "Teacher: 'default' (the embedded SmolLM2-135M-Instruct), a folder or Hub id."
    +    teacher_name_or_path: str = field(default="default", metadata={"help": TEACHER_HELP})
    -    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    +    parser = HfArgumentParser((ScriptArguments, DistillationConfig))
    +    teacher = script_args.teacher_name_or_path
    +    if teacher == "default":
    +        teacher, _ = hf_recover.load_default_teacher()
    -    trainer = Trainer(
    +    trainer = DistillationTrainer(
    +        teacher_model=teacher,

(`-` lines are the plain script's, `+` lines the recovery script's). `DistillationConfig` is `TrainingArguments`
plus the loss fields (`--alpha`, `--beta`, `--temperature`, `--divergence`, `--gamma`, `--delta`, `--layer_map`, ...),
so every `TrainingArguments` flag works as before. The trainer saves `pruned_config.json` and a model card next to
the weights and tokenizer. (A width-pruned student whose blocks differ in MLP size loads with
`hf_recover.load_pruned` instead of `AutoModelForCausalLM`; see examples/width_recovery.py.)

Usage (the student is a folder written by `hf-recover prune` or by `prune_depth`/`prune_width` + `save_pretrained`;
the teacher defaults to the embedded SmolLM2-135M-Instruct and the data to the embedded offline corpus):

    python examples/drop_in.py --model_name_or_path out/student --output_dir out/recovered \\
        --max_steps 60 --per_device_train_batch_size 4 --learning_rate 1e-4 --logging_steps 10 --max_length 256

    # your own data and teacher, and a stronger recipe
    python examples/drop_in.py --model_name_or_path out/student --teacher_name_or_path my/teacher \\
        --dataset notes/ books.jsonl --output_dir out/recovered --divergence skew_forward_kl --delta 1.0
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, default_data_collator

import hf_recover
from hf_recover import DistillationConfig, DistillationTrainer  # hf_recover: import

TEACHER_HELP = "Teacher: 'default' (the embedded SmolLM2-135M-Instruct), a folder or Hub id."  # hf_recover: + teacher


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "The model to train: a local folder or a Hub id."})
    teacher_name_or_path: str = field(default="default", metadata={"help": TEACHER_HELP})  # hf_recover: + teacher
    dataset: list[str] = field(
        default_factory=lambda: ["default"],
        metadata={"help": "Training text: local .txt/.json/.jsonl/.parquet files or folders, or 'default'."},
    )
    max_length: int = field(default=512, metadata={"help": "Tokens per packed training block."})


def main(argv: list[str] | None = None):
    parser = HfArgumentParser((ScriptArguments, DistillationConfig))  # hf_recover: class name
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path)
    teacher = script_args.teacher_name_or_path  # hf_recover: + teacher
    if teacher == "default":  # hf_recover: + teacher
        teacher, _ = hf_recover.load_default_teacher()  # hf_recover: + teacher

    # Text from local files (or the embedded corpus), packed into blocks of max_length tokens with labels.
    raw = hf_recover.load_recovery_data(script_args.dataset)
    train_dataset = hf_recover.prepare_recovery_dataset(raw, tokenizer, max_length=script_args.max_length)

    trainer = DistillationTrainer(  # hf_recover: class name
        model=model,
        teacher_model=teacher,  # hf_recover: + teacher
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    trainer.train()
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    main()
