"""`hf-recover cache`: run the teacher once over the training data and store its top-k distributions.

    hf-recover cache --teacher default --output_dir out/teacher-cache --top_k 64 --tail_samples 16
    hf-recover recover --teacher default --student out/student --teacher_cache out/teacher-cache --gamma 0
    torchrun --nproc_per_node 4 -m hf_recover.cli cache --teacher default --output_dir out/teacher-cache

The training data is prepared exactly as `hf-recover recover` prepares it (same `--dataset`, `--max_length`,
`--max_train_documents`, `--data_seed_value`), so the cache lines up with recover's training rows. The folder gets
the shards, `teacher_cache.json` and a dataset card. Rerunning an interrupted command resumes it; `--overwrite`
replaces an existing cache. Under `torchrun` / `accelerate launch` every process writes its own shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base.loading import load_model
from .arguments import DEFAULT, TrainingTextArguments, command_parser, load_text_splits


@dataclass
class CacheArguments:
    teacher: str = field(
        default=DEFAULT, metadata={"help": "Teacher: 'default' (embedded SmolLM2), folder or Hub id."}
    )
    output_dir: str = field(default="outputs/teacher-cache", metadata={"help": "Folder to write the cache to."})
    top_k: int = field(default=64, metadata={"help": "Teacher tokens kept per position, in [1, vocabulary]."})
    tail_samples: int | None = field(
        default=None,
        metadata={
            "help": "Tokens drawn per position from the rest of the vocabulary (at the largest temperature), over "
            "which training spreads the tail's mass instead of keeping it as one bucket; 5 bytes each per token. "
            "0: one bucket. Default 16 (fewer when the tail is smaller)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the tail samples' generator."})
    temperatures: list[float] = field(
        default_factory=lambda: [1.0, 2.0],
        metadata={"help": "Temperatures training may use (each adds 4 bytes per token); others are refused."},
    )
    dtype: str = field(default="float16", metadata={"help": "Stored log-probabilities: float16 or float32."})
    batch_size: int = field(default=8, metadata={"help": "Rows per teacher forward."})
    shard_size: int = field(default=256, metadata={"help": "Rows per shard (the unit of resuming)."})
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": "The teacher's dtype, as recover's --teacher_dtype ('auto': as saved); recover checks it."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing cache in --output_dir."})


def make_parser(subparsers=None):
    return command_parser(subparsers, "cache", (CacheArguments, TrainingTextArguments), __doc__)


def main(args: CacheArguments, data_args: TrainingTextArguments):
    from ..base.data import prepare_recovery_dataset
    from ..distill.teacher_cache import cache_teacher_outputs, load_teacher_cache

    teacher, tokenizer = load_model(args.teacher, dtype=args.teacher_dtype)
    train = prepare_recovery_dataset(load_text_splits(data_args)["train"], tokenizer, max_length=data_args.max_length)
    output_dir = cache_teacher_outputs(
        teacher,
        train,
        args.output_dir,
        top_k=args.top_k,
        tail_samples=args.tail_samples,
        seed=args.seed,
        temperatures=args.temperatures,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        tokenizer=tokenizer,
        packing=True,  # recover packs its training data
        teacher_name=args.teacher,
        overwrite=args.overwrite,
    )
    metadata = load_teacher_cache(output_dir).metadata
    samples = f" + {metadata['tail_samples']} tail samples" if metadata.get("tail_samples") else ""
    print(
        f"Cached the top-{metadata['top_k']}{samples} of {args.teacher} on {metadata['num_rows']} blocks of "
        f"{metadata['max_length']} tokens: {metadata['bytes_per_token']:.0f} bytes per token, "
        f"temperatures {metadata['temperatures']}.\nTeacher cache: {output_dir}"
    )
    return output_dir
