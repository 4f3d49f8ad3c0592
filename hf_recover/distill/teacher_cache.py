"""The teacher runs once: its top-k distributions cached on disk, for distillation without a teacher in memory.

`cache_teacher_outputs` runs a teacher over a prepared dataset (`hf_recover.prepare_recovery_dataset`, packed or
padded) and writes, next to `input_ids` / `attention_mask` / `labels`, for every position:

- `teacher_top_ids` `(max_length, k)`: the teacher's `k` most likely next tokens (uint16 when the vocabulary fits,
  else int32);
- `teacher_top_logprobs` `(max_length, k)`: their log-probabilities at `T = 1` (float16 by default);
- `teacher_tail_logmass_T{T}` `(max_length,)`, one column per cached temperature `T`: `log Σ_tail p_v^(1/T)`, the
  log of the unnormalised mass of all the other tokens at `T` (float32);
- with `tail_samples = s > 0`, tokens drawn from the tail (`hf_recover.base.losses.topk.sample_tail`) at the largest
  cached temperature `T_s`: `teacher_tail_sample_ids` and `teacher_tail_sample_logprobs` `(max_length, s)` (distinct
  tokens, their log-probabilities at `T = 1`) and `teacher_tail_sample_counts_T{T_s}` (uint8, how often each was
  drawn). Training then splits the tail's exact mass over them instead of keeping it as one bucket, which makes
  the forward-KL gradient an unbiased estimate of the full-vocabulary one at `T_s`.

Temperature convention: the top-k of `z / T` is the top-k of `z`, and `p_T(i) ∝ p_i^(1/T)`, so with these columns
the teacher's distribution at each cached `T` is known *exactly* on the top-k tokens plus one tail bucket
(`hf_recover.base.losses.topk`). Training at a temperature the cache does not hold is refused; cache it with
`temperatures=(...)`. The KD term is then the divergence between the bucketed teacher and the bucketed student, a
lower bound of the full-vocabulary divergence, equal to it at `k` = vocabulary.

The cache is a folder of `datasets` shards (Arrow, memory-mapped) with `teacher_cache.json` (teacher name,
revision, weights and tokenizer fingerprints, the dataset's fingerprint, `max_length`, packing, `top_k`, dtypes,
temperatures, each shard's files and checksums, hf_recover's version) and a dataset card (`README.md`). An
interrupted build resumes: finished shards are kept. Under `torchrun` / `accelerate launch`, process `r` of `n`
builds shards `r, r + n, ...`; the result is the same as one process's. `load_teacher_cache` checks everything
before training starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.data import MODEL_INPUT_COLUMNS, pad_rows
from ..base.losses import teacher_top_k
from ..base.losses.topk import sample_tail
from ..base.version import __version__
from .fingerprints import dataset_fingerprint, tokenizer_fingerprint, weights_fingerprint
from .shards import ShardedBuild, load_shards, read_metadata, stored_bytes

METADATA_NAME = "teacher_cache.json"
FORMAT_VERSION = 1
WHAT = "teacher cache"
BUILD_HINT = "hf_recover.cache_teacher_outputs or `hf-recover cache`"

TOP_IDS_COLUMN = "teacher_top_ids"
TOP_LOGPROBS_COLUMN = "teacher_top_logprobs"
TAIL_COLUMN_PREFIX = "teacher_tail_logmass_T"
SAMPLE_IDS_COLUMN = "teacher_tail_sample_ids"
SAMPLE_LOGPROBS_COLUMN = "teacher_tail_sample_logprobs"
SAMPLE_COUNTS_PREFIX = "teacher_tail_sample_counts_T"
MAX_TAIL_SAMPLES = 255
"""Draw counts are stored as uint8."""
DEFAULT_TAIL_SAMPLES = 16
"""With `top_k = 64` at T = 2, 16 tail samples brought KD from the cache within 0.1 point of online KD's recovery,
where the one-bucket tail lost 1.4 / 3.1 points (`benchmarks/teacher_cache.py --quality`)."""
LOGPROB_DTYPES = ("float16", "float32")
TEMPERATURE_CONVENTION = (
    "teacher_top_logprobs are log-probabilities at T = 1; teacher_tail_logmass_T{T} is log sum over the other "
    "tokens of p_v^(1/T); the distribution at T on the top-k tokens plus one tail bucket is "
    "softmax([teacher_top_logprobs / T, teacher_tail_logmass_T{T}]), exact at every cached T."
)


def tail_column(temperature: float) -> str:
    """The column holding the tail's log-mass at `temperature`, e.g. `teacher_tail_logmass_T2`."""
    return f"{TAIL_COLUMN_PREFIX}{float(temperature):g}"


def sample_counts_column(sample_temperature: float) -> str:
    """The column holding the tail samples' draw counts, named after the temperature they were drawn at."""
    return f"{SAMPLE_COUNTS_PREFIX}{float(sample_temperature):g}"


def tail_sample_columns(column_names: Sequence[str]) -> tuple[str, str, str] | None:
    """`(ids, logprobs, counts)` columns of a cache's tail samples, or `None` when it holds none."""
    counts = [name for name in column_names if name.startswith(SAMPLE_COUNTS_PREFIX)]
    if not counts or SAMPLE_IDS_COLUMN not in column_names:
        return None
    return SAMPLE_IDS_COLUMN, SAMPLE_LOGPROBS_COLUMN, counts[0]


def column_temperature(column: str) -> float:
    """The temperature in a column's name (`teacher_tail_logmass_T2` -> 2.0)."""
    return float(column.rsplit("_T", 1)[1])


def cached_temperatures(column_names: Sequence[str]) -> tuple[float, ...]:
    """The temperatures a cached dataset holds, read from its column names."""
    return tuple(
        float(name[len(TAIL_COLUMN_PREFIX) :]) for name in column_names if name.startswith(TAIL_COLUMN_PREFIX)
    )


def is_teacher_cache(column_names: Sequence[str]) -> bool:
    """Whether a dataset carries cached teacher outputs."""
    return {TOP_IDS_COLUMN, TOP_LOGPROBS_COLUMN} <= set(column_names) and bool(cached_temperatures(column_names))


def teacher_cache_columns(column_names: Sequence[str]) -> list[str]:
    """The cached teacher's columns among `column_names`."""
    cached = (TOP_IDS_COLUMN, TOP_LOGPROBS_COLUMN, SAMPLE_IDS_COLUMN, SAMPLE_LOGPROBS_COLUMN)
    prefixes = (TAIL_COLUMN_PREFIX, SAMPLE_COUNTS_PREFIX)
    return [name for name in column_names if name in cached or name.startswith(prefixes)]


# -- building -------------------------------------------------------------------------------------------------------


def _output_vocab(teacher: nn.Module) -> int:
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if head is not None:
        return head.weight.shape[0]
    return teacher.config.get_text_config().vocab_size


def _check_build_args(
    teacher, dataset, top_k, temperatures, batch_size, shard_size, dtype, tail_samples
) -> tuple[int, int, int]:
    """Everything a build needs, checked before any work: (vocabulary, max_length, tail samples)."""
    vocab = _output_vocab(teacher)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be an integer in [1, {vocab}] (the teacher's vocabulary), got {top_k!r}.")
    if tail_samples is None:  # the default, as many as the tail holds
        tail_samples = min(DEFAULT_TAIL_SAMPLES, vocab - top_k)
    if isinstance(tail_samples, bool) or not isinstance(tail_samples, int) or tail_samples < 0:
        raise ValueError(f"tail_samples must be an integer >= 0 (0: the tail as one bucket), got {tail_samples!r}.")
    if tail_samples > min(MAX_TAIL_SAMPLES, vocab - top_k):
        raise ValueError(
            f"tail_samples={tail_samples} is too many: at most {MAX_TAIL_SAMPLES} (draw counts are uint8) and at most "
            f"the tail's {vocab - top_k} tokens (vocabulary {vocab} minus top_k {top_k})."
        )
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if dtype not in LOGPROB_DTYPES:
        raise ValueError(f"dtype must be one of {LOGPROB_DTYPES} (the stored log-probabilities), got {dtype!r}.")
    if not temperatures or any(not isinstance(t, int | float) or not math.isfinite(t) or t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be finite numbers > 0, at least one, got {temperatures!r}.")
    if len({tail_column(t) for t in temperatures}) != len(temperatures):
        raise ValueError(f"temperatures holds the same temperature twice: {temperatures!r}.")
    missing = [c for c in MODEL_INPUT_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The dataset has no column {missing}; cache a prepared dataset (hf_recover.prepare_recovery_dataset), "
            f"whose columns are {list(MODEL_INPUT_COLUMNS)}."
        )
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to cache.")
    lengths = {len(dataset[0]["input_ids"]), len(dataset[len(dataset) - 1]["input_ids"])}
    if len(lengths) != 1:
        raise ValueError(f"Rows of the dataset differ in length ({sorted(lengths)}); prepare fixed-length blocks.")
    return vocab, lengths.pop(), tail_samples


def _features(dataset, max_length: int, top_k: int, vocab: int, dtype: str, temperatures, tail_samples: int):
    from datasets import Array2D, Features, Sequence, Value

    ids_dtype = "uint16" if vocab <= 2**16 else "int32"
    features = {name: dataset.features[name] for name in MODEL_INPUT_COLUMNS}
    features[TOP_IDS_COLUMN] = Array2D(shape=(max_length, top_k), dtype=ids_dtype)
    features[TOP_LOGPROBS_COLUMN] = Array2D(shape=(max_length, top_k), dtype=dtype)
    for temperature in temperatures:
        features[tail_column(temperature)] = Sequence(Value("float32"), length=max_length)
    if tail_samples:
        features[SAMPLE_IDS_COLUMN] = Array2D(shape=(max_length, tail_samples), dtype=ids_dtype)
        features[SAMPLE_LOGPROBS_COLUMN] = Array2D(shape=(max_length, tail_samples), dtype=dtype)
        counts = sample_counts_column(max(temperatures))
        features[counts] = Array2D(shape=(max_length, tail_samples), dtype="uint8")
    return Features(features), ids_dtype


@torch.inference_mode()
def _build_shard(teacher, rows, features, top_k, temperatures, tail_samples, seed, batch_size, device, progress):
    """One shard: the teacher's top-k outputs (and tail samples) for `rows` (a `Dataset`), as a `Dataset` with
    `features`. Tail samples are drawn with a generator seeded by `seed`: a shard is the same whoever builds it."""
    import numpy as np
    from datasets import Dataset

    ids_dtype = features[TOP_IDS_COLUMN].dtype
    logprob_dtype = features[TOP_LOGPROBS_COLUMN].dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    inputs = rows.with_format("torch", columns=["input_ids", "attention_mask"])
    outputs: dict[str, list] = {key: [] for key in ("ids", "logprobs", "tails", "sample_ids", "sample_lp", "counts")}
    for start in range(0, len(rows), batch_size):
        batch = inputs[start : start + batch_size]
        logits = teacher(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
        ).logits
        n, length, vocab = logits.shape
        flat = logits.reshape(-1, vocab)
        ids, logprobs, tail = teacher_top_k(flat, top_k, temperatures)  # (n·L, ...)
        outputs["ids"].append(ids.reshape(n, length, top_k).cpu().numpy().astype(ids_dtype))
        outputs["logprobs"].append(logprobs.reshape(n, length, top_k).cpu().numpy().astype(logprob_dtype))
        outputs["tails"].append(tail.reshape(n, length, -1).cpu().numpy())
        if tail_samples:
            drawn = sample_tail(flat, ids, tail_samples, max(temperatures), generator)
            kinds = {"sample_ids": ids_dtype, "sample_lp": logprob_dtype, "counts": "uint8"}
            for (key, kind), value in zip(kinds.items(), drawn):
                outputs[key].append(value.reshape(n, length, tail_samples).cpu().numpy().astype(kind))
        progress.update(n)
    columns = {name: rows[name] for name in MODEL_INPUT_COLUMNS}
    columns[TOP_IDS_COLUMN] = np.concatenate(outputs["ids"])
    columns[TOP_LOGPROBS_COLUMN] = np.concatenate(outputs["logprobs"])
    tail = np.concatenate(outputs["tails"])
    for i, temperature in enumerate(temperatures):
        columns[tail_column(temperature)] = tail[..., i]
    if tail_samples:
        columns[SAMPLE_IDS_COLUMN] = np.concatenate(outputs["sample_ids"])
        columns[SAMPLE_LOGPROBS_COLUMN] = np.concatenate(outputs["sample_lp"])
        columns[sample_counts_column(max(temperatures))] = np.concatenate(outputs["counts"])
    return Dataset.from_dict(columns, features=features)


def cache_teacher_outputs(
    teacher: nn.Module,
    dataset,
    output_dir: str | os.PathLike,
    *,
    top_k: int = 64,
    temperatures: Sequence[float] = (1.0, 2.0),
    batch_size: int = 8,
    shard_size: int = 256,
    dtype: str = "float16",
    tail_samples: int | None = None,
    seed: int = 0,
    tokenizer: Any = None,
    packing: bool | None = None,
    teacher_name: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Run `teacher` once over a prepared `dataset` and write its top-k distributions to `output_dir`.

    Args:
        teacher: a causal LM (any device; under `torchrun` / `accelerate launch` it is moved to each process's
            device). Put in eval mode; no gradients.
        dataset: a prepared dataset (`input_ids`, `attention_mask`, `labels` of equal, fixed length).
        top_k: tokens kept per position, in [1, vocabulary]. At 64 with float16 log-probabilities and a
            vocabulary under 65,536 tokens, the teacher columns take 264 bytes per token (with two temperatures).
        temperatures: the temperatures training may use; each adds 4 bytes per token (see the module docstring).
        batch_size: rows per teacher forward. shard_size: rows per shard (the unit of resuming and of work under
            several processes).
        dtype: `"float16"` (default) or `"float32"` for the stored log-probabilities.
        tail_samples: tokens drawn per position from the rest of the vocabulary, at the largest of
            `temperatures`, to spread the tail's mass over (0: the tail stays one bucket). Default `None`: 16, or
            the whole tail when it is smaller. 5 bytes per sample and token; 16 samples with `top_k = 64` keep the
            whole dataset under 400 bytes per token. seed: their generator's seed (shard `i` draws with `seed + i`).
        tokenizer: the teacher's tokenizer, fingerprinted into the metadata so that training with another one is
            refused. packing: recorded in the metadata (`None`: inferred, every attention mask full).
        teacher_name: recorded as the teacher's name (default: its `config._name_or_path`).
        overwrite: replace an existing cache in `output_dir`. Without it an existing cache is an error, and an
            interrupted build of the same teacher and dataset is resumed.

    Returns:
        `output_dir`, loadable with `load_teacher_cache`.
    """
    from tqdm.auto import tqdm

    temperatures = tuple(float(t) for t in temperatures)
    fingerprint = dataset_fingerprint(dataset)  # of the rows as given: what training passes back to be checked
    if set(MODEL_INPUT_COLUMNS) <= set(dataset.column_names) and len(dataset):  # chat rows: one length for the arrays
        pad_id = getattr(tokenizer, "pad_token_id", None)
        dataset = pad_rows(dataset, pad_id if pad_id is not None else getattr(tokenizer, "eos_token_id", None) or 0)
    vocab, max_length, tail_samples = _check_build_args(
        teacher, dataset, top_k, temperatures, batch_size, shard_size, dtype, tail_samples
    )
    features, ids_dtype = _features(dataset, max_length, top_k, vocab, dtype, temperatures, tail_samples)
    if packing is None:
        packing = all(all(mask) for mask in dataset["attention_mask"])
    config = getattr(teacher, "config", None)
    plan = {
        "format_version": FORMAT_VERSION,
        "teacher": teacher_name or getattr(config, "_name_or_path", None) or type(teacher).__name__,
        "teacher_revision": getattr(config, "_commit_hash", None),
        "teacher_fingerprint": weights_fingerprint(teacher),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "dataset_fingerprint": fingerprint,
        "num_rows": len(dataset),
        "max_length": max_length,
        "packing": packing,
        "vocab_size": vocab,
        "top_k": top_k,
        "logprob_dtype": dtype,
        "token_id_dtype": ids_dtype,
        "temperatures": list(temperatures),
        "temperature_convention": TEMPERATURE_CONVENTION,
        "tail_samples": tail_samples,
        "sample_temperature": max(temperatures) if tail_samples else None,
        "seed": seed,
        "shard_size": shard_size,
    }
    build = ShardedBuild(output_dir, plan, metadata_name=METADATA_NAME, what=WHAT, overwrite=overwrite)

    teacher.eval()
    device = build.device if build.num_processes > 1 else next(teacher.parameters()).device
    if build.num_processes > 1:
        teacher.to(device)
    todo = build.pending()
    with tqdm(
        total=sum(len(build.rows(i)) for i in todo), desc="Caching teacher outputs", unit="row",
        disable=not show_progress, position=0,
    ) as progress:  # fmt: skip
        for index in todo:
            rows = dataset.select(build.rows(index))
            shard = _build_shard(
                teacher, rows, features, top_k, temperatures, tail_samples, seed + index, batch_size, device, progress
            )
            build.save(index, shard)
    build.finish(lambda shards: _finish(Path(output_dir), plan, shards))
    return Path(output_dir)


def _finish(output_dir: Path, plan: dict, shards: list[dict]) -> dict:
    """The metadata of a finished cache (and its dataset card, written beside it)."""
    tokens = plan["num_rows"] * plan["max_length"]
    metadata = {
        **plan,
        "hf_recover_version": __version__,
        "shards": shards,
        "bytes_per_token": stored_bytes(shards) / tokens,
    }
    _dataset_card(metadata).save(output_dir / "README.md")
    return metadata


CARD_TEMPLATE = """
# Teacher cache of {teacher}

The top-{top_k} next-token distributions of `{teacher}` on {num_rows} blocks of {max_length} tokens
({packing}), written by hf_recover's `cache_teacher_outputs` for
distillation without the teacher in memory (`DistillationTrainer(teacher_model=None, teacher_cache=...)`).

Columns: `input_ids`, `attention_mask`, `labels` (the prepared dataset), `{ids}` and `{logprobs}`
(`(max_length, top_k)`: the teacher's {top_k} most likely tokens and their log-probabilities at T = 1, {dtype}),
and one `{tail}{{T}}` column per cached temperature ({temperatures}): the log of the other tokens' unnormalised
mass at T. At each cached T, `softmax([logprobs / T, tail])` is the teacher's exact distribution on the top-k
tokens plus one tail bucket.
{samples}

Storage: {bytes_per_token:.0f} bytes per token, {num_shards} shards. Teacher weights sha256 `{fingerprint}`.
"""


def _dataset_card(metadata: dict):
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(tags=["hf-recover", "knowledge-distillation", "teacher-cache"])
    body = CARD_TEMPLATE.format(
        teacher=metadata["teacher"],
        top_k=metadata["top_k"],
        num_rows=metadata["num_rows"],
        max_length=metadata["max_length"],
        packing="packed" if metadata["packing"] else "padded",
        ids=TOP_IDS_COLUMN,
        logprobs=TOP_LOGPROBS_COLUMN,
        tail=TAIL_COLUMN_PREFIX,
        dtype=metadata["logprob_dtype"],
        temperatures=", ".join(f"{t:g}" for t in metadata["temperatures"]),
        bytes_per_token=metadata["bytes_per_token"],
        num_shards=metadata["num_shards"],
        fingerprint=metadata["teacher_fingerprint"],
        samples=(
            f"\nTail samples: {metadata['tail_samples']} tokens per position drawn from the rest of the vocabulary at "
            f"T = {metadata['sample_temperature']:g} (`{SAMPLE_IDS_COLUMN}`, `{SAMPLE_LOGPROBS_COLUMN}`, "
            f"`{SAMPLE_COUNTS_PREFIX}{metadata['sample_temperature']:g}`); training splits the tail's mass over "
            "them.\n"
            if metadata.get("tail_samples")
            else ""
        ),
    )
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")


# -- loading and checking -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherCache:
    """A loaded teacher cache: the dataset (torch format, memory-mapped) and its metadata."""

    dataset: Any
    metadata: dict
    path: Path

    @property
    def temperatures(self) -> tuple[float, ...]:
        return tuple(self.metadata["temperatures"])


def load_teacher_cache(
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    teacher: nn.Module | str | None = None,
    dataset=None,
    max_length: int | None = None,
    temperature: float | None = None,
    verify_checksums: bool = True,
) -> TeacherCache:
    """Load a cache written by `cache_teacher_outputs` and check it against what training will use.

    Every given argument is compared with the metadata, and a mismatch is a `ValueError` naming it: `tokenizer`
    (fingerprint), `teacher` (a model: weights fingerprint; a name or path: the recorded name), `dataset` (the
    prepared dataset training would use: same rows in the same order), `max_length`, `temperature` (must be one of
    the cached ones). Missing shards are a `FileNotFoundError`; truncated or corrupted ones (file sizes, and sha256
    with `verify_checksums`) a `ValueError`.
    """
    path = Path(path)
    metadata = read_cache_metadata(path)
    check_cache_metadata(
        metadata, path, tokenizer=tokenizer, teacher=teacher, max_length=max_length, temperature=temperature
    )
    cached = load_shards(path, metadata, what=WHAT, verify_checksums=verify_checksums)
    if dataset is not None and dataset_fingerprint(dataset) != metadata["dataset_fingerprint"]:
        raise ValueError(
            f"The teacher cache {path} was built on another dataset than the one given (its input_ids/attention_mask/"
            "labels differ, or their order): cache the training dataset itself, or train on the cache's rows "
            "(pass teacher_cache= without train_dataset)."
        )
    return TeacherCache(dataset=cached.with_format("torch"), metadata=metadata, path=path)


def read_cache_metadata(path: str | os.PathLike) -> dict:
    """A teacher cache's metadata, without reading its shards: a `FileNotFoundError` when there is no finished
    cache at `path`."""
    return read_metadata(
        path, metadata_name=METADATA_NAME, format_version=FORMAT_VERSION, what=WHAT, build_hint=BUILD_HINT
    )


def check_cache_metadata(
    metadata: dict,
    path: Path | str,
    *,
    tokenizer: Any = None,
    teacher: nn.Module | str | None = None,
    max_length: int | None = None,
    temperature: float | None = None,
) -> None:
    """Compare a cache's metadata with what training uses; a `ValueError` names the first mismatch."""
    expected = tokenizer_fingerprint(tokenizer)
    if expected is not None and metadata["tokenizer_fingerprint"] not in (None, expected):
        raise ValueError(
            f"The teacher cache {path} was built with another tokenizer than the student's: its token ids mean other "
            "tokens. Build the cache with the student's tokenizer (the teacher's, which the student shares)."
        )
    if isinstance(teacher, nn.Module) and weights_fingerprint(teacher) != metadata["teacher_fingerprint"]:
        raise ValueError(
            f"The teacher cache {path} was built with other teacher weights than the teacher given "
            f"(cache: {metadata['teacher']}, weights sha256 {metadata['teacher_fingerprint'][:12]}...). Rebuild the "
            "cache with this teacher, or train with the teacher the cache was built from."
        )
    if isinstance(teacher, str | os.PathLike) and str(teacher) != metadata["teacher"]:
        raise ValueError(
            f"The teacher cache {path} was built with the teacher {metadata['teacher']!r}, not {str(teacher)!r}."
        )
    if max_length is not None and max_length != metadata["max_length"]:
        raise ValueError(
            f"The teacher cache {path} holds blocks of max_length {metadata['max_length']}, training uses "
            f"{max_length}: rebuild the cache with --max_length {max_length}, or train with {metadata['max_length']}."
        )
    if temperature is not None and tail_column(temperature) not in map(tail_column, metadata["temperatures"]):
        raise ValueError(
            f"The teacher cache {path} holds the temperatures {metadata['temperatures']}, not {temperature}: "
            f"train at one of them, or rebuild the cache with temperatures=(..., {temperature})."
        )
