"""Training from a teacher cache: how `DistillationTrainer` takes one and reads it batch by batch.

`training_cache_columns` runs once, before `Trainer.__init__`: it loads and checks a cache given as
`teacher_cache=` (or detects the cached columns in `train_dataset`), makes it the training data with a collator
that keeps its columns, and refuses what a cache cannot give (the teacher's hidden states, an uncached
temperature) and a run that needs a teacher but has neither a teacher nor a cache.

With a cache and no `teacher_model`, KD is taken on the cached top-k plus a tail bucket, or the tail's mass
spread over the cached tail samples (`hf_recover.base.losses.topk`), CE in the same pass, and no teacher is loaded.
The cache is checked against the student's tokenizer, `temperature` and, when given, `train_dataset` (same rows
in the same order).

`split_cached_teacher` runs on every batch: it takes the cached columns out of the model's inputs and returns
them as a `TopKTeacher` for the loss.
"""

from __future__ import annotations

from typing import Any

from ..base.losses import TopKTeacher
from ..base.losses.topk import tail_share
from .teacher_cache import (
    TOP_IDS_COLUMN,
    TOP_LOGPROBS_COLUMN,
    cached_temperatures,
    column_temperature,
    is_teacher_cache,
    tail_column,
    tail_sample_columns,
    teacher_cache_columns,
)

NO_HIDDEN_STATES_IN_CACHE = (
    "Alignment (gamma) and feature dynamics distillation (delta) compare the teacher's hidden states, which a teacher "
    "cache does not hold: pass teacher_model= as well (the cache is then not used), or set gamma = delta = 0 to "
    "distil from the cache alone."
)


def training_cache_columns(teacher_cache, teacher_model, args, trainer_kwargs: dict[str, Any]) -> tuple[str, ...]:
    """Check a teacher cache (given, or detected in `train_dataset`) before any work and make it the training data
    in `trainer_kwargs`; return the cached columns the loss reads (empty when no cache is used: a live teacher
    is given, there is none, or `beta = 0`)."""
    from transformers import default_data_collator

    if teacher_cache is not None:
        trainer_kwargs["train_dataset"] = _checked_cache(teacher_cache, args, trainer_kwargs).dataset
    dataset = trainer_kwargs.get("train_dataset")
    columns = getattr(dataset, "column_names", None)
    cached = columns is not None and is_teacher_cache(columns)
    if args.uses_teacher and teacher_model is None and not cached:
        raise ValueError(
            "teacher_model is required when beta, gamma or delta > 0: pass the teacher model or its path (or, for "
            "KD alone, a teacher cache: teacher_cache=). For cross-entropy only, set beta=gamma=delta=0."
        )
    if teacher_model is not None or not cached:
        return ()
    if args.wants_hidden_states:
        raise ValueError(NO_HIDDEN_STATES_IN_CACHE)
    if args.beta == 0:
        return ()  # cross-entropy only: nothing of the cache is read
    needed = (TOP_IDS_COLUMN, TOP_LOGPROBS_COLUMN, tail_column(args.temperature))
    if needed[2] not in columns:
        raise ValueError(
            f"The teacher cache in train_dataset holds the temperatures {list(cached_temperatures(columns))}, not "
            f"temperature={args.temperature}: train at one of them, or rebuild the cache with "
            f"temperatures=(..., {args.temperature})."
        )
    needed += tail_sample_columns(columns) or ()
    trainer_kwargs["train_dataset"] = dataset.with_format("torch")  # arrays as tensors, not lists of floats
    if trainer_kwargs.get("data_collator") is None:
        trainer_kwargs["data_collator"] = default_data_collator  # stacks every column, the cached ones included
    return needed


def _checked_cache(teacher_cache, args, trainer_kwargs: dict[str, Any]):
    """A `TeacherCache` from a folder or a loaded one, checked against the student's tokenizer, the temperature and
    a given `train_dataset` (same rows)."""
    from .fingerprints import dataset_fingerprint
    from .teacher_cache import TeacherCache, check_cache_metadata, load_teacher_cache

    tokenizer = trainer_kwargs.get("processing_class")
    temperature = args.temperature if args.beta > 0 else None
    given = trainer_kwargs.get("train_dataset")
    if not isinstance(teacher_cache, TeacherCache):
        return load_teacher_cache(teacher_cache, tokenizer=tokenizer, dataset=given, temperature=temperature)
    check_cache_metadata(teacher_cache.metadata, teacher_cache.path, tokenizer=tokenizer, temperature=temperature)
    if given is not None and dataset_fingerprint(given) != teacher_cache.metadata["dataset_fingerprint"]:
        raise ValueError(
            f"The teacher cache {teacher_cache.path} was built on another dataset than train_dataset: cache the "
            "training dataset itself, or pass the cache without train_dataset."
        )
    return teacher_cache


def split_cached_teacher(
    inputs: dict[str, Any], columns: tuple[str, ...]
) -> tuple[dict[str, Any], TopKTeacher | None]:
    """A batch's model inputs without any cached teacher column, and the cached teacher read from `columns` (the
    output of `training_cache_columns`; `None` when empty or when the batch carries no cache, e.g. evaluation
    data that was not cached)."""
    cached = teacher_cache_columns(list(inputs))
    if not cached:
        return inputs, None
    model_inputs = {name: value for name, value in inputs.items() if name not in cached}
    if not columns or columns[2] not in inputs:
        return model_inputs, None
    ids, logprobs, tail = (inputs[name] for name in columns[:3])
    if len(columns) == 3:
        return model_inputs, TopKTeacher(ids.long(), logprobs, tail)  # uint16 ids come as int64 or uint16 tensors
    sample_ids, sample_logprobs, counts = (inputs[name] for name in columns[3:])
    share = tail_share(counts, sample_logprobs.float(), column_temperature(columns[2]), column_temperature(columns[5]))
    return model_inputs, TopKTeacher(ids.long(), logprobs, tail, sample_ids.long(), share)
