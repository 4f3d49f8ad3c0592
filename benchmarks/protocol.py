"""The demo's protocol, shared by the recovery benchmarks: the embedded teacher, the corpus prepared as
`hf-recover demo` prepares it, its calibration blocks and evaluation splits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hf_recover.base.data import (
    CALIBRATION_BLOCKS,
    first_blocks,
    load_text_splits,
    prepare_eval_splits,
    prepare_recovery_dataset,
)
from hf_recover.base.defaults import load_default_teacher
from hf_recover.distill.answer_filter import KEEP_ALL_ANSWERS
from hf_recover.recovery import DEMO_DEFAULTS

QUICK_TEACHER_DATA = {"num_prompts": 16, "answer_tokens": 32, "answer_filter": KEEP_ALL_ANSWERS}
"""A smoke run's own small teacher data (`teacher_mixture` keywords): every answer, few of which end in 32 tokens."""


def use_cores() -> int:
    """Run torch on every core, or on `OMP_NUM_THREADS` of them where it is set (a run beside another job)."""
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


@dataclass(frozen=True)
class DemoText:
    """How the demo prepares its text: `hf-recover demo`'s data settings."""

    max_length: int = DEMO_DEFAULTS["max_length"]
    max_train_documents: int = DEMO_DEFAULTS["max_train_documents"]
    calibration_blocks: int = CALIBRATION_BLOCKS


@dataclass
class DemoProtocol:
    teacher: Any
    tokenizer: Any
    data_args: DemoText
    text: Any
    """The training text, packed into the demo's blocks."""
    calibration: Any
    """The text's first `calibration_blocks` blocks: where cuts are scored and healed."""
    eval_splits: dict[str, Any]


def demo_protocol(*, eval_blocks: int, held_out: bool = True) -> DemoProtocol:
    """The teacher (frozen), the demo's text, calibration blocks and `eval_blocks` evaluation blocks per split
    (`held_out`: with the held-out domains)."""
    data_args = DemoText()
    teacher, tokenizer = load_default_teacher()
    teacher.eval().requires_grad_(False)
    splits = load_text_splits(held_out=held_out, max_train_documents=data_args.max_train_documents)
    text = prepare_recovery_dataset(splits["train"], tokenizer, max_length=data_args.max_length)
    calibration = first_blocks(text, data_args.calibration_blocks)
    eval_splits = prepare_eval_splits(splits, tokenizer, blocks=eval_blocks)
    return DemoProtocol(teacher, tokenizer, data_args, text, calibration, eval_splits)


def quiet_run_args() -> dict:
    """`TrainingArguments` of a measured run: seeded, no saves, no reports, no progress bar."""
    import torch

    return dict(
        logging_steps=5, save_strategy="no", report_to="none", seed=42, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip


def recovery_trainer(teacher, tokenizer, student, pruned_config, train, output_dir: str, **overrides):
    """A `DistillationTrainer` with `DistillationConfig.for_depth_recovery()` (and `overrides`) that goes through
    `train` once."""
    import math

    from hf_recover import DistillationConfig, DistillationTrainer

    config = DistillationConfig.for_depth_recovery(output_dir=output_dir, **{**quiet_run_args(), **overrides})
    config.max_steps = math.ceil(len(train) / config.rows_per_step)
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=config, pruned_config=pruned_config, train_dataset=train,
        processing_class=tokenizer,
    )  # fmt: skip
