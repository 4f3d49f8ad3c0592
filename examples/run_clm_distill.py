"""Causal-LM training in the shape of transformers' `examples/pytorch/language-modeling/run_clm.py`, turned into
distillation-based recovery of a pruned student by five marked lines (`# hf_recover: ...`):

    -from transformers import TrainingArguments, Trainer
    +from hf_recover import DistillationConfig, DistillationTrainer
    +    teacher_name_or_path: str | None = None
    -    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    +    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, DistillationConfig))
    -    trainer = Trainer(
    +    trainer = DistillationTrainer(
    +        teacher_model=model_args.teacher_name_or_path,

(`-` lines are the plain script's, `+` lines this one's; `--teacher_name_or_path` is the teacher's folder or Hub
id.) Everything else is an ordinary `run_clm` script: argument dataclasses parsed by `HfArgumentParser`, text
files (or a Hub dataset) tokenized and cut into blocks by `group_texts`, `Trainer.train`/`evaluate`, and the
perplexity printed as `math.exp(metrics["eval_loss"])`. That stays the student's perplexity after the change:
in evaluation, `DistillationTrainer` reports the student's own language-modelling loss as `eval_loss`, and the
distillation objective beside it as `eval_distillation_loss` (with `eval_ce`, `eval_kd`, ...).

Usage (a pruned student written by `hf-recover prune`, its teacher, local text files):

    python examples/run_clm_distill.py --model_name_or_path out/student --teacher_name_or_path my/teacher \\
        --train_file train.txt --validation_file valid.txt --block_size 256 --do_train --do_eval \\
        --per_device_train_batch_size 4 --learning_rate 1e-4 --max_steps 60 --output_dir out/recovered
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from itertools import chain

from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    default_data_collator,
    set_seed,
)

from hf_recover import DistillationConfig, DistillationTrainer  # hf_recover: import


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "The model to train: a local folder or a Hub id."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    teacher_name_or_path: str | None = None  # hf_recover: + teacher


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub (instead of files)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Training text: a .txt, .json/.jsonl or .csv."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation text, in the same format."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Without a validation split: this share of the training data is held out."}
    )
    text_column: str = field(default="text", metadata={"help": "The column that holds the text."})
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per training block (defaults to the model's context, at most 1024)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation blocks."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks in .txt files."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Give --dataset_name, or --train_file and/or --validation_file.")
        for path in (self.train_file, self.validation_file):
            if path is not None and path.rsplit(".", 1)[-1] not in ("txt", "json", "jsonl", "csv"):
                raise ValueError(f"{path}: the data files must be .txt, .json, .jsonl or .csv.")


def load_raw_datasets(data_args: DataTrainingArguments):
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    else:
        files = {
            split: path
            for split, path in (("train", data_args.train_file), ("validation", data_args.validation_file))
            if path is not None
        }
        extension = next(iter(files.values())).rsplit(".", 1)[-1]
        builder = {"txt": "text", "jsonl": "json"}.get(extension, extension)
        options = {"keep_linebreaks": data_args.keep_linebreaks} if builder == "text" else {}
        raw = load_dataset(builder, data_files=files, **options)
    if "validation" not in raw and "train" in raw:
        # hold out the first percent of the training rows, as run_clm does
        percent = data_args.validation_split_percentage
        raw["validation"] = raw["train"].select(range(max(1, len(raw["train"]) * percent // 100)))
        raw["train"] = raw["train"].select(range(len(raw["validation"]), len(raw["train"])))
    return raw


def main(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, DistillationConfig))  # hf_recover: class name
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)

    raw_datasets = load_raw_datasets(data_args)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)

    def tokenize(examples):
        return tokenizer(examples[data_args.text_column])

    column_names = raw_datasets["train" if training_args.do_train else "validation"].column_names
    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw_datasets.map(tokenize, batched=True, remove_columns=column_names)

    block_size = data_args.block_size or min(tokenizer.model_max_length, 1024)

    def group_texts(examples):
        # Concatenate every text, then cut it into blocks of block_size tokens (the remainder is dropped);
        # the labels are the inputs: the model shifts them itself.
        concatenated = {key: list(chain(*examples[key])) for key in examples}
        total = len(concatenated["input_ids"]) // block_size * block_size
        blocks = {
            key: [values[i : i + block_size] for i in range(0, total, block_size)]
            for key, values in concatenated.items()
        }
        blocks["labels"] = [list(ids) for ids in blocks["input_ids"]]
        return blocks

    with training_args.main_process_first(desc="grouping texts"):
        lm_datasets = tokenized.map(group_texts, batched=True)

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = lm_datasets["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if training_args.do_eval:
        eval_dataset = lm_datasets["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    trainer = DistillationTrainer(  # hf_recover: class name
        model=model,
        teacher_model=model_args.teacher_name_or_path,  # hf_recover: + teacher
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    metrics = {}
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        try:
            perplexity = math.exp(metrics["eval_loss"])
        except OverflowError:
            perplexity = float("inf")
        metrics["perplexity"] = perplexity
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return trainer, metrics


if __name__ == "__main__":
    main()
