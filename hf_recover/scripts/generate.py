"""`hf-recover generate`: the teacher writes recovery data: its answers to prompts, and unconditional samples.

    hf-recover generate --teacher default --output_dir out/teacher-data --num_prompts 256
    hf-recover generate --teacher default --prompts prompts.jsonl --output_dir out/teacher-data
    hf-recover generate --teacher my-base-model --num_prompts 0 --num_samples 512 --output_dir out/samples
    torchrun --nproc_per_node 4 -m hf_recover.cli generate --teacher default --output_dir out/teacher-data

Without `--prompts`, the teacher writes `--num_prompts` user requests itself from its chat template's pre-query
text (Magpie), kept when complete, new and within the length bounds; with `--prompts` (a .json/.jsonl/.parquet
file or folder with a `prompt` or `messages` column, TRL's conventions), it answers those. Answers are greedy unless
`--answer_temperature` is set. The folder gets the rows (datasets shards), `teacher_data.json` (the teacher's and
tokenizer's fingerprints, every setting, the seed) and can be passed to `hf-recover recover --teacher_data`. Rerun
an interrupted command to finish it; `--overwrite` replaces existing data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base.loading import load_model
from .arguments import command_parser, model_field


@dataclass
class GenerateArguments:
    teacher: str = model_field()
    output_dir: str = field(default="outputs/teacher-data", metadata={"help": "Folder to write the data to."})
    prompts: str | None = field(
        default=None,
        metadata={"help": "Prompts to answer: a file or folder with a `prompt` or `messages` column (else Magpie)."},
    )
    num_prompts: int = field(default=256, metadata={"help": "Prompts the teacher writes itself (without --prompts)."})
    num_samples: int = field(default=0, metadata={"help": "Unconditional samples (for base models, or beside)."})
    answer_tokens: int = field(default=256, metadata={"help": "Longest answer, in tokens."})
    answer_temperature: float = field(default=0.0, metadata={"help": "0: greedy answers; else sampled at it."})
    prompt_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of Magpie prompts."})
    sample_tokens: int = field(default=256, metadata={"help": "Length of each unconditional sample, in tokens."})
    min_prompt_tokens: int = field(default=4, metadata={"help": "Shortest synthesised prompt kept."})
    max_prompt_tokens: int = field(default=64, metadata={"help": "Longest synthesised prompt kept."})
    max_prompt_perplexity: float | None = field(
        default=None, metadata={"help": "Drop synthesised prompts more perplexing than this to the teacher."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of every sampled token."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per generate call."})
    shard_size: int = field(default=64, metadata={"help": "Rows per shard (the unit of resuming)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace existing data in --output_dir."})


def make_parser(subparsers=None):
    return command_parser(subparsers, "generate", (GenerateArguments,), __doc__)


def main(args: GenerateArguments):
    from ..base.data import load_local_files
    from ..base.generation import Sampling
    from ..distill.teacher_data import PromptFilter, build_teacher_data, given_prompts, load_teacher_data

    prompt_filter = PromptFilter(args.min_prompt_tokens, args.max_prompt_tokens, args.max_prompt_perplexity)
    answers = Sampling(temperature=args.answer_temperature, max_new_tokens=args.answer_tokens)
    prompts = load_local_files(args.prompts) if args.prompts is not None else None
    if prompts is not None:
        given_prompts(prompts)  # its columns and prompts, before the teacher is loaded (its special tokens after)
    teacher, tokenizer = load_model(args.teacher)
    output_dir = build_teacher_data(
        teacher, tokenizer, args.output_dir, prompts=prompts, num_prompts=args.num_prompts,
        num_samples=args.num_samples, answer_sampling=answers,
        prompt_sampling=Sampling(temperature=args.prompt_temperature, max_new_tokens=args.max_prompt_tokens + 1),
        sample_sampling=Sampling(temperature=1.0, max_new_tokens=args.sample_tokens), prompt_filter=prompt_filter,
        seed=args.seed, batch_size=args.batch_size, shard_size=args.shard_size, teacher_name=args.teacher,
        overwrite=args.overwrite,
    )  # fmt: skip
    data = load_teacher_data(output_dir)
    kinds = {kind: data["kind"].count(kind) for kind in ("answer", "sample")}
    tokens = sum(len(ids) for ids in data["input_ids"])
    print(f"{kinds['answer']} answers and {kinds['sample']} samples, {tokens:,} tokens.\nTeacher data: {output_dir}")
    return output_dir
