"""The teacher of a distillation run: loading and placing it, and checking that it can teach this student.

A teacher can only teach a student that reads and writes the same tokens. Two checks run before any work: the
output vocabularies may differ only by embedding padding rows (`hf_recover.base.losses.shared_vocab_size`), and when
both tokenizers are known, every token id both have must stand for the same token.
"""

from __future__ import annotations

import os
from copy import deepcopy
from typing import Any

from torch import nn

from ..base.losses import shared_vocab_size
from .lm_head import text_config

MISMATCHES_SHOWN = 3
"""How many differing token ids a tokenizer mismatch error names."""


def load_teacher(name_or_path: str | os.PathLike, dtype: str = "auto") -> nn.Module:
    """A teacher given as a folder or Hub id, in `dtype` ("auto": as saved, or a torch dtype name), whatever its
    per-block sizes (a pruned model can teach too).

    Never `device_map="auto"`: under DDP every process holds its own full copy, placed by the trainer.
    """
    from ..base.loading import load_pruned, resolve_dtype

    return load_pruned(name_or_path, dtype=resolve_dtype(name_or_path, dtype))


def load_teacher_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer saved with a teacher given by path or Hub id, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):  # no tokenizer files there: only the vocabulary sizes can be compared
        return None


def output_vocab(model: nn.Module) -> int | None:
    """Rows of the model's output embedding (its logits' width), when it exposes one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.shape[0] if head is not None else None


def check_vocabularies(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher's logits may have more rows than the student's only by embedding padding."""
    vocab = (output_vocab(student), output_vocab(teacher))
    if None not in vocab:
        shared_vocab_size(*vocab)


def check_tokenizers(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Every token id both tokenizers have must be the same token; raise naming the first ids that differ.

    Tokenizers of different sizes pass when the ids they share agree (added special tokens, padding rows).
    `None` for either (unknown) skips the check. Processors are compared through their `tokenizer`.
    """
    student_tokenizer = getattr(student_tokenizer, "tokenizer", student_tokenizer)
    teacher_tokenizer = getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer)
    if student_tokenizer is None or teacher_tokenizer is None or student_tokenizer is teacher_tokenizer:
        return
    if not (hasattr(student_tokenizer, "get_vocab") and hasattr(teacher_tokenizer, "get_vocab")):
        return
    student_ids = {index: token for token, index in student_tokenizer.get_vocab().items()}
    teacher_ids = {index: token for token, index in teacher_tokenizer.get_vocab().items()}
    differing = sorted(i for i in student_ids.keys() & teacher_ids.keys() if student_ids[i] != teacher_ids[i])
    if differing:
        shown = ", ".join(
            f"id {i} is {student_ids[i]!r} for the student but {teacher_ids[i]!r} for the teacher"
            for i in differing[:MISMATCHES_SHOWN]
        )
        raise ValueError(
            f"The teacher's tokenizer differs from the student's ({len(differing)} token ids stand for other tokens: "
            f"{shown}). Logit distillation compares the two models token by token, so they must share a tokenizer: "
            "distil from the model the student was pruned from, or pass the matching `processing_class`."
        )


def prepare_deepspeed_teacher(teacher: nn.Module, accelerator) -> nn.Module:
    """An inference-only DeepSpeed engine for the teacher, as TRL's `prepare_deepspeed` builds it."""
    import deepspeed

    config = deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = config["zero_optimization"]["stage"]
    hidden_size = getattr(text_config(teacher), "hidden_size", None)
    if hidden_size is not None and stage == 3:
        config["zero_optimization"].update(
            reduce_bucket_size=hidden_size * hidden_size,
            stage3_param_persistence_threshold=10 * hidden_size,
            stage3_prefetch_bucket_size=0.9 * hidden_size * hidden_size,
        )
    if stage != 3:  # ZeRO-1/2 shard optimizer states only, and the teacher has none
        config["zero_optimization"]["stage"] = 0
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    return engine.eval()
