"""`hf-recover recover`: recover a pruned student from its teacher with `DistillationTrainer`.

    hf-recover recover --teacher default --prune angular:6:heal=lstsq --output_dir out/recovered
    hf-recover recover --teacher default --prune importance:6 --output_dir out/recovered --max_steps 120 --gamma 0
    hf-recover recover --teacher default --student out/student --output_dir out/recovered
    hf-recover recover --config recover.yaml
    hf-recover recover --teacher default --student out/student --teacher_cache out/teacher-cache --gamma 0

The student is a pruned model folder (`--student`, with its `pruned_config.json`) or is pruned from the
teacher here (`--prune`, a prune spec: the grammar is below). The teacher, the cut as made, the healed start (when
healed) and the recovered student are measured on `validation`, `ood` and, with the default corpus, the held-out
domains; with a chat teacher, the assistant too (`--chat_prompts`). The training text is mixed with the teacher's
own answers (`--teacher_data`, `--chat_fraction`). The output folder gets
the recovered model, tokenizer, `pruned_config.json`, a model card, `results.json`, `results.md` and
`loss_curve.png`. Training follows `DistillationConfig.for_depth_recovery()` unless flags say otherwise: every
`DistillationConfig` / `TrainingArguments` flag works (`--learning_rate`, `--alpha`, ...).
With `--teacher_cache` (from `hf-recover cache` on the same data; `--gamma 0`, since a cache holds no hidden states for
the preset's alignment term), KD reads the cached top-k teacher
distributions and the teacher runs only for the before/after perplexities.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..base.loading import load_model, resolve_dtype
from ..base.precision import check_precision, with_precision
from ..distill.config import DistillationConfig
from .arguments import (
    DEFAULT,
    DataArguments,
    MixtureArguments,
    check_output_dir,
    command_parser,
    load_text_splits,
    prepare_eval_splits,
)

logger = logging.getLogger(__name__)


@dataclass
class RecoverArguments:
    teacher: str = field(
        default=DEFAULT, metadata={"help": "Teacher: 'default' (embedded SmolLM2), folder or Hub id."}
    )
    student: str | None = field(default=None, metadata={"help": "A pruned student folder (else --prune is used)."})
    prune: str | None = field(
        default=None,
        metadata={"help": "Prune the teacher here, by a prune spec (its grammar: --help, docs/pruning.md)."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Write into a non-empty --output_dir (files of the same name are replaced)."}
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "A teacher cache folder (hf-recover cache): KD from the cached top-k, no teacher forward."},
    )
    on_policy_steps: int = field(
        default=0,
        metadata={
            "help": "After the off-policy run (the warm start), this many steps of an on-policy phase on the teacher "
            "data's prompts (DistillationConfig.for_on_policy_phase(): half the batches the student's own answers "
            "scored by the teacher, reverse KL clipped at 1 per token; half the teacher's answers). 0: none."
        },
    )
    precision: str | None = field(
        default=None,
        metadata={
            "help": "The type training and evaluation compute in: bfloat16 (--bf16), float32, or auto: bfloat16 where "
            "the CPU or GPU computes it natively (AVX512-BF16 or AMX, Ampere on), else float32. Unset: --bf16 decides."
        },
    )

    def __post_init__(self):
        check_precision(self.precision)  # when the flags are read, before any work


RECOVER_DEFAULTS = {
    "output_dir": "outputs/recovered",
    **DistillationConfig.DEPTH_RECOVERY_RECIPE,  # the recommended recipe: loss, optimizer, batches of 2
    "max_steps": 120,
    "logging_steps": 5,
    "save_strategy": "no",
    "report_to": "none",
}


def make_parser(subparsers=None, *, name: str = "recover", doc: str = __doc__, defaults: dict | None = None):
    types = (RecoverArguments, DataArguments, MixtureArguments, DistillationConfig)
    defaults = {**RECOVER_DEFAULTS, **(defaults or {})}
    return command_parser(subparsers, name, types, doc, takes_prune_specs=True, **defaults)


def main(
    recover_args: RecoverArguments, data_args: DataArguments, mix_args: MixtureArguments, config: DistillationConfig
):
    from ..base.chat import has_chat_template
    from ..base.data import first_blocks, prepare_recovery_dataset
    from ..base.pruned_config import PrunedConfig
    from ..distill.evaluation_cache import model_fingerprint
    from ..distill.teacher_data import assistant_reference
    from ..prune.spec import PruneSpec
    from ..recovery import run_recovery, teacher_mixture
    from ..starts import cached_build

    start = time.perf_counter()
    # Check everything that can be wrong before any model or data is loaded.
    output_dir = check_output_dir(config.output_dir, recover_args.overwrite)
    config = with_precision(config, recover_args.precision)
    if (recover_args.student is None) == (recover_args.prune is None):
        raise ValueError("Give exactly one of --student (a pruned model folder) or --prune (a spec to prune with).")
    spec = PruneSpec.parse(recover_args.prune) if recover_args.prune else None
    if recover_args.student and not Path(recover_args.student).is_dir():
        raise FileNotFoundError(f"--student {recover_args.student} is not a folder.")
    if recover_args.on_policy_steps < 0:
        raise ValueError(f"--on_policy_steps must be >= 0, got {recover_args.on_policy_steps}.")
    answers_only = mix_args.uses_teacher_data and mix_args.chat_fraction > 0 and mix_args.sample_fraction == 0
    if recover_args.on_policy_steps and (recover_args.teacher_cache or not answers_only):
        raise ValueError(
            "--on_policy_steps answers the teacher data's prompts with the teacher in memory: train on the teacher's "
            "answers (--teacher_data auto or a folder, --chat_fraction > 0, --sample_fraction 0: a sample has no "
            "prompt) and without --teacher_cache."
        )
    temperature = config.temperature if config.beta > 0 else None
    if recover_args.teacher_cache:
        from ..distill.teacher_cache import check_cache_metadata, read_cache_metadata

        metadata = read_cache_metadata(recover_args.teacher_cache)
        check_cache_metadata(
            metadata, recover_args.teacher_cache, max_length=data_args.max_length, temperature=temperature
        )

    if recover_args.teacher_cache and mix_args.uses_teacher_data:
        if mix_args.teacher_data != "auto":
            raise ValueError(
                "--teacher_cache holds the teacher on the text's rows: train from it with --teacher_data none, or "
                "cache the mixture itself with hf_recover.cache_teacher_outputs."
            )
        mix_args.teacher_data = "none"  # the cache stands for the teacher on the text alone
    if mix_args.uses_teacher_data and mix_args.teacher_data != "auto":
        from ..distill.teacher_data import read_teacher_data_metadata

        read_teacher_data_metadata(mix_args.teacher_data)  # a missing or damaged folder, before the corpus is read

    # float32 first: a student pruned from the teacher is trained in float32, whatever the teacher's dtype
    teacher, tokenizer = load_model(recover_args.teacher)
    chat = has_chat_template(tokenizer) and mix_args.chat_prompts != "none"
    if not has_chat_template(tokenizer) and mix_args.chat_prompts != "none":
        # a base model has no assistant to measure: said, not silently skipped
        log = logger.warning if mix_args.chat_prompts != MixtureArguments.chat_prompts else logger.info
        log(
            "%s has no chat template (a base model): the assistant is not measured and --chat_prompts %s is ignored.",
            recover_args.teacher, mix_args.chat_prompts,
        )  # fmt: skip
    if mix_args.uses_teacher_data and mix_args.chat_fraction > 0 and not has_chat_template(tokenizer):
        if mix_args.teacher_data != "auto":
            raise ValueError(
                f"{recover_args.teacher} has no chat template, so it cannot answer prompts: set --chat_fraction 0 "
                "(and --sample_fraction for its unconditional samples), or --teacher_data none."
            )
        logger.info("The teacher has no chat template (a base model): recovery trains on its samples and the text.")
        mix_args.chat_fraction = 0.0
    splits = load_text_splits(data_args)
    train = prepare_recovery_dataset(splits["train"], tokenizer, max_length=data_args.max_length)
    # the cut is scored and healed on the text's first blocks, with or without a mixture: the same cut either way
    calibration = first_blocks(train, data_args.calibration_blocks)
    eval_splits = prepare_eval_splits(splits, tokenizer, data_args)
    rows_per_step = config.rows_per_step
    data_folder = None
    if mix_args.uses_teacher_data:  # the teacher's answers beside the text, once through, as many tokens as text alone
        budget = mix_args.train_tokens or config.max_steps * rows_per_step * data_args.max_length
        train, data_folder = teacher_mixture(
            teacher, tokenizer, train, train_tokens=budget, seed=data_args.data_seed_value,
            overwrite_teacher_data=mix_args.overwrite_teacher_data,
            **mix_args.teacher_data_settings(),
        )  # fmt: skip
        config.max_steps = -(-len(train) // rows_per_step)
    elif mix_args.train_tokens:
        config.max_steps = -(-mix_args.train_tokens // (rows_per_step * data_args.max_length))
    reference = assistant_reference(teacher, tokenizer, mix_args.chat_prompts) if chat else None
    setup = {"teacher, data, reference answers": time.perf_counter() - start}  # each phase's seconds, for the table

    if spec is not None:
        spec.check(teacher, calibration)
        # built once, then read from the cache; scored once for the cut as made and the healed one
        block_scores, teacher_key = {}, model_fingerprint(teacher)
        cut = None
        if spec.heals:
            cut = cached_build(
                spec.without_healing(), teacher, calibration, teacher_key=teacher_key, block_scores=block_scores
            )[0]
        student, pruned_config, _ = cached_build(
            spec, teacher, calibration, teacher_key=teacher_key, block_scores=block_scores
        )
    else:
        cut = None
        student, _ = load_model(recover_args.student)
        pruned_config = PrunedConfig.find_for(student)
    setup["prune and heal"] = time.perf_counter() - start - sum(setup.values())
    # The trainer applies teacher_dtype only to a teacher it loads itself; this one was loaded here.
    teacher.to(resolve_dtype(recover_args.teacher, config.teacher_dtype))
    teacher_cache = None
    if recover_args.teacher_cache:  # built by this teacher, in this dtype, on these rows
        from ..distill.teacher_cache import load_teacher_cache

        teacher_cache = load_teacher_cache(
            recover_args.teacher_cache, tokenizer=tokenizer, teacher=teacher, dataset=train, temperature=temperature
        )

    on_policy = None
    if recover_args.on_policy_steps:  # from the warm start, on the mixture's chat rows
        chat_rows = train.filter(lambda n: n > 0, input_columns="prompt_length", keep_in_memory=True)
        # the run's own settings (precision, checkpointing, logging) with the phase's recipe, in a folder of its own
        phase = replace(
            config, **DistillationConfig.ON_POLICY_PHASE_RECIPE, max_steps=recover_args.on_policy_steps,
            output_dir=str(Path(config.output_dir) / "on-policy-phase"),
        )  # fmt: skip
        on_policy = (phase, chat_rows)
    trainer, result = run_recovery(
        teacher=teacher,
        student=student,
        tokenizer=tokenizer,
        args=config,
        train_dataset=train,
        eval_splits=eval_splits,
        pruned_config=pruned_config,
        datasets=list(data_args.dataset) + ([f"teacher data ({data_folder.name})"] if data_folder else []),
        teacher_cache=teacher_cache,
        chat=reference,
        cut=cut,
        on_policy=on_policy,
    )
    result.wall_time = time.perf_counter() - start
    result.phase_seconds = {**setup, **result.phase_seconds}
    pruned = spec.to_dict() if spec is not None else recover_args.student
    write_results(output_dir, result, {"strategy": strategy_summary(config), "prune": pruned})
    print(result.to_markdown())
    print(f"\nRecovered model, tokenizer, pruned_config.json and model card: {output_dir}")
    return result


STRATEGY_FIELDS = (
    "alpha", "beta", "gamma", "delta", "temperature", "divergence", "skew_lambda", "jsd_beta", "alignment",
    "layer_map", "learning_rate", "lr_scheduler_type", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "seed",
)  # fmt: skip


def strategy_summary(config: DistillationConfig) -> dict:
    """The recovery settings worth recording next to the results."""
    return {name: getattr(config, name) for name in STRATEGY_FIELDS}


def write_results(output_dir: Path, result, extra: dict) -> None:
    """`results.json`, `results.md` and `loss_curve.png` next to the recovered model."""
    from ..base.reporting import plot_loss_curves

    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {**result.card_metrics(), "wall_time": result.wall_time, **extra}
    (output_dir / "results.json").write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    (output_dir / "results.md").write_text(result.to_markdown() + "\n")
    plot_loss_curves(
        {"recovery": result.log_history}, output_dir / "loss_curve.png", keys=("loss", "ce", "kd", "align", "fdd")
    )
