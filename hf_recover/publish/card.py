"""The model card of a recovered model.

`generate_model_card` renders `model_cards/recovered_model.md` (a Jinja template shipped in the wheel) into a
`huggingface_hub.ModelCard`; it is pure. `save_model_card` writes it as `README.md`, merging into a README that is
already there. The sentences are in the template: this module hands it plain values (numbers, lists, dicts,
booleans) and the filters that format numbers. The trainer's save hooks and `push_recovered` call these.

A card written by the trainer also carries everything `Trainer.create_model_card` writes, as the plain values
`hf_recover.publish.trainer_card` takes from transformers' own `TrainingSummary` of the run (`trainer_run=`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from enum import Enum
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..base.pruned_config import PrunedConfig
from ..base.reporting import (
    MODELS,
    assistant_rows,
    assistant_table,
    before_after_rows,
    before_after_table,
    format_parameters,
    format_percent,
)
from ..base.version import __version__
from .card_merge import as_list as _as_list
from .card_merge import merge_into_existing, merge_metadata
from .card_pruning import positive_number, pruning_facts

logger = logging.getLogger(__name__)

CARD_TEMPLATE = "recovered_model.md"
CARD_NAME = "README.md"
"""Our section of a README lies between these markers; the user's text outside them is never touched."""

BASE_TAGS = ("hf-recover",)

CARD_METRICS = (
    "perplexity",
    "assistant",
    "answers",
    "train_steps",
    "train_tokens",
    "train_runtime",
    "teacher_parameters",
    "student_parameters",
)
"""The keys `generate_model_card(metrics=...)` reads (`RecoveryResult.card_metrics()` gives them)."""


def generate_model_card(
    *,
    pruned_config: PrunedConfig | Mapping[str, Any] | None = None,
    config: Any = None,
    metrics: Mapping[str, Any] | None = None,
    datasets: str | Iterable[str] | None = None,
    model_name: str | None = None,
    hub_model_id: str | None = None,
    trainer_run: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Render the model card of a recovered model. Pure: reads no file, writes nothing.

    Args:
        pruned_config: what was pruned (a `PrunedConfig` or its dict). Gives the teacher (`base_model`),
            the kept/removed blocks, per-block MLP sizes, parameter counts and the licence.
        config: the training configuration, a `DistillationConfig`/`TrainingArguments` or a dict with the
            same field names (`alpha`, `beta`, `gamma`, `delta`, `temperature`, `divergence`,
            `skew_lambda`, `jsd_beta`, `alignment`, `layer_map`, `projector`, `learning_rate`, ...).
            Missing fields are left out of the card.
        metrics: what recovery achieved, every key optional (`CARD_METRICS` lists them)::

                {
                    "perplexity": {
                        "validation": {"teacher": 22.5, "pruned": 46.5, "recovered": 25.6},
                        "ood": {...},
                    },
                    "train_steps": 60,
                    "train_tokens": 61440,
                    "train_runtime": 490.0,  # seconds
                    "teacher_parameters": 134515008,
                    "student_parameters": 106000000,
                }

            Recovery % and retention are computed per split (with `recovery_metrics`) when its three
            perplexities are present. Parameter counts here override those of `pruned_config`.
        datasets: names of the recovery data. Hub dataset ids (`namespace/name`) go into the card's
            metadata and are linked; free-text descriptions appear only in the body.
        model_name: the card's title (defaults to the last part of `hub_model_id`).
        hub_model_id: the repo the model is (or will be) pushed to; used by the usage snippet.
        trainer_run: what Trainer's own card shows for a `Trainer` run, as plain values
            (`hf_recover.publish.trainer_card.trainer_run_facts`): `metadata` (with `base_model` = `finetuned_from`,
            `language`, `license`, `tags`, `datasets`, `model-index`), `model_name`, `finetuned_from`, `datasets`,
            `eval_results`, `hyperparameters` and `results_table`. They join the card.

    Returns:
        A `huggingface_hub.ModelCard` whose metadata has `base_model` (the teacher, or the summary's
        `finetuned_from`), `library_name`, `pipeline_tag`, `tags`, `datasets` and `license` where known. A value
        that is not known leaves its line or table out of the card.

    Raises:
        ValueError: `metrics` has a key (or a perplexity entry names a model) the card does not know.
    """
    metrics = checked_card_metrics(metrics)
    pruned = _as_pruned_config(pruned_config)
    run = trainer_run  # what Trainer's own card shows, or None
    dataset_names = _as_list(datasets)
    if run is not None:  # Trainer's dataset names (`dataset=`), after ours
        dataset_names = list(dict.fromkeys([*dataset_names, *run["datasets"]]))
    teacher = pruned.teacher_name_or_path if pruned else None
    distillation = _uses_teacher(config)

    tags = [*BASE_TAGS]
    if pruned is not None:
        tags += ["pruned", *(f"{kind}-pruning" for kind in pruned.pruning_types)]
    if distillation:
        tags.append("knowledge-distillation")
    hub_datasets = [name for name in dataset_names if _is_hub_id(name)]
    ours = ModelCardData(
        base_model=teacher if teacher and _is_hub_id(teacher) else None,
        datasets=hub_datasets or None,
        library_name="transformers",
        license=pruned.license if pruned and pruned.license else None,
        pipeline_tag="text-generation",
        tags=tags,
    ).to_dict()
    if run is not None:
        # Trainer's metadata joins ours: its tags, datasets and languages extend ours, its model-index is added, and
        # its base model (`finetuned_from`) and licence, the caller's or by default the teacher's, win where set.
        ours = merge_metadata(ours, run["metadata"])
        model_name = model_name or run["model_name"]
    card_data = ModelCardData(ignore_metadata_errors=True, **ours)
    results = _eval_results(metrics)
    if results:  # the card's own figures in its model-index, beside Trainer's
        card_data.eval_results = [*(card_data.eval_results or []), *results]
        card_data.model_name = card_data.model_name or model_name or (hub_model_id or "recovered-model").split("/")[-1]
    context = {
        "card_data": card_data.to_yaml(),
        "model_name": model_name or (hub_model_id.split("/")[-1] if hub_model_id else None),
        "teacher": _teacher_facts(teacher, pruned.teacher_revision if pruned else None),
        "finetuned_from": _finetuned_from_facts(run, teacher),
        "trainer": run,
        "pruning_kinds": list(pruned.pruning_types) if pruned else [],
        "distillation": distillation,
        "pruning": pruning_facts(pruned, metrics) if pruned else None,
        "loss": _loss_facts(config, pruned),
        "datasets": [{"name": name, "on_hub": _is_hub_id(name)} for name in dataset_names],
        "training": _training_facts(config, metrics, pruned, bool(run and run["hyperparameters"])),
        "results_table": before_after_table(metrics["perplexity"])
        if before_after_rows(metrics["perplexity"])
        else None,
        "assistant_table": assistant_table(metrics["assistant"]) if assistant_rows(metrics["assistant"]) else None,
        "answers": list(metrics["answers"] or []),
        "usage": {
            "model_id": hub_model_id or "path/to/this/model",
            # blocks of different MLP sizes do not fit one `intermediate_size`: plain from_pretrained cannot build them
            "load_pruned": any(
                len(set(values)) > 1
                for values in ((pruned.student_intermediate_sizes, pruned.student_attention_heads) if pruned else ())
            ),
        },
        "versions": _versions(),
    }
    return ModelCard(_template().render(**context))


def save_model_card(
    output_dir: str | os.PathLike,
    *,
    pruned_config: PrunedConfig | Mapping[str, Any] | None = None,
    **card_args: Any,
) -> Path:
    """Write the card of `generate_model_card` as `output_dir/README.md`; return its path. `card_args` are the
    other keyword arguments of `generate_model_card` (`config`, `metrics`, `datasets`, `model_name`,
    `hub_model_id`, `trainer_run`).

    Call it on the main process only (the trainer's save hooks do). When `pruned_config` is None, the
    `pruned_config.json` saved in `output_dir` (if any) is used. An existing README is updated, never
    clobbered: its metadata is merged (our values fill and extend it, tags and datasets are unioned,
    its other keys are kept) and only our section, between `<!-- hf_recover:begin -->` and
    `<!-- hf_recover:end -->`, is replaced; a README without that section gets it appended. A README
    that cannot be merged safely (unreadable metadata, unbalanced markers) is left as it is, with a
    warning.
    """
    directory = Path(output_dir)
    if directory.is_file():
        raise ValueError(f"output_dir {directory} is a file; give the folder the model is saved in.")
    if pruned_config is None:
        pruned_config = saved_pruned_config(directory)
    card = generate_model_card(pruned_config=pruned_config, **card_args)
    path = directory / CARD_NAME
    if path.is_file():
        merged = merge_into_existing(path, card)
        if merged is None:
            return path
        card = merged
    directory.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path


def saved_pruned_config(folder: Path) -> PrunedConfig | None:
    """The `pruned_config.json` saved in the model folder `folder`, or None."""
    if not folder.is_dir():  # not saved yet: nothing to find (and not a Hub id to look up)
        return None
    return PrunedConfig.find_for(folder)


# -- the template and its number formats -------------------------------------------------------------------


@cache
def _template():
    import jinja2

    source = resources.files("hf_recover.model_cards").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8")
    # finalize: a None that slips through renders as nothing, never as the string "None"
    env = jinja2.Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        finalize=lambda value: "" if value is None else value,
        autoescape=False,  # Markdown, not HTML
    )
    env.filters.update(
        number=_number,
        indices=_indices,
        thousands=lambda value: f"{int(value):,}",
        parameters=format_parameters,
        percent=format_percent,
        duration=_duration,
        python_string=json.dumps,
        blockquote=lambda text: "\n".join("> " + line for line in (str(text).strip() or "(no answer)").splitlines()),
    )
    return env.from_string(source)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _indices(values: Iterable[int], sort: bool = True) -> str:
    values = sorted(values) if sort else list(values)
    return "[" + ", ".join(str(v) for v in values) + "]"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


# -- what goes into the card: plain values ------------------------------------------------------------------


def checked_card_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    metrics = dict(metrics or {})
    unknown = sorted(str(key) for key in metrics if key not in CARD_METRICS)
    if unknown:
        raise ValueError(
            f"metrics has keys the model card does not know: {unknown}. Known keys: {list(CARD_METRICS)} "
            "(e.g. {'perplexity': {'validation': {'teacher': 22.5, 'pruned': 46.5, 'recovered': 25.6}}})."
        )
    metrics.setdefault("assistant", None)
    metrics.setdefault("answers", None)
    perplexity = metrics.setdefault("perplexity", None)
    splits = perplexity.items() if isinstance(perplexity, Mapping) else ()
    for split, values in splits:
        unknown = sorted(str(m) for m in values if m not in MODELS) if isinstance(values, Mapping) else []
        if unknown:
            raise ValueError(
                f"metrics['perplexity'][{split!r}] names models the model card does not know: {unknown}. "
                f"Known models: {list(MODELS)}."
            )
    return metrics


EVAL_DATASETS = {"perplexity": "hf-recover/recovery-text", "assistant": "hf-recover/chat-prompts"}
"""The dataset types the model-index names for hf_recover's figures (its evaluation sets have no Hub id)."""


ASSISTANT_RESULTS = (
    ("perplexity", "Perplexity of the teacher's answers"),
    ("top1_agreement", "Top-1 agreement"),
    ("finish_rate", "Finished answers"),
    ("refusal_rate", "Refusals"),
    ("instruction_prompt_accuracy", "Instruction following, prompt level (strict)"),
    ("instruction_accuracy", "Instruction following, instruction level (strict)"),
)
"""The assistant's figures of the recovered model that its `model-index` carries, with their names."""


def _eval_results(metrics: Mapping[str, Any]) -> list[EvalResult]:
    """The recovered model's figures as `model-index` entries: its perplexity on every split, on the teacher's
    answers with its top-1 agreement, and what its own answers are like (`ASSISTANT_RESULTS`)."""
    results = []
    for split, values in (metrics["perplexity"] or {}).items():
        if isinstance(values, Mapping) and values.get("recovered") is not None:
            results.append(
                EvalResult(
                    task_type="text-generation", dataset_type=EVAL_DATASETS["perplexity"], dataset_name=str(split),
                    dataset_split=str(split), metric_type="perplexity", metric_value=float(values["recovered"]),
                    metric_name="Perplexity",
                )
            )  # fmt: skip
    recovered = (metrics["assistant"] or {}).get("recovered") or {}
    for key, name in ASSISTANT_RESULTS:
        if recovered.get(key) is not None:
            results.append(
                EvalResult(
                    task_type="text-generation", dataset_type=EVAL_DATASETS["assistant"], dataset_name="chat prompts",
                    metric_type=key, metric_value=float(recovered[key]), metric_name=name,
                )
            )  # fmt: skip
    return results


def _uses_teacher(config: Any) -> bool:
    """Whether the run distils from a teacher.

    A `DistillationConfig` answers itself (`uses_teacher`). A dict or another `TrainingArguments` counts as
    distillation unless it gives the teacher terms' weights (β, γ, δ) and none is positive; no config at all counts
    as distillation (hf_recover's default recipe).
    """
    if hasattr(config, "uses_teacher"):
        return bool(config.uses_teacher)
    weights = [_get(config, name) for name in ("beta", "gamma", "delta")]
    if config is None or all(w is None for w in weights):
        return True
    return any(positive_number(w) for w in weights)


def _teacher_facts(teacher: str | None, revision: str | None) -> dict[str, Any] | None:
    if not teacher:
        return None
    return {"name": teacher, "on_hub": _is_hub_id(teacher), "revision": revision, "short_name": _short_name(teacher)}


def _short_name(name: str) -> str:
    return name.rstrip("/").split("/")[-1]


def _loss_facts(config: Any, pruned: PrunedConfig | None) -> dict[str, Any] | None:
    """The active loss terms with their weights and settings; None without a config or any active term."""
    if config is None:
        return None
    alpha, beta, gamma, delta = (_get(config, name) for name in ("alpha", "beta", "gamma", "delta"))
    facts = {
        "ce": {"alpha": alpha} if positive_number(alpha) else None,
        "kd": _divergence_facts(config, beta) if positive_number(beta) else None,
        "align": (
            {"gamma": gamma, "alignment": _get(config, "alignment"), "projector": _get(config, "projector")}
            if positive_number(gamma)
            else None
        ),
        "fdd": {"delta": delta} if positive_number(delta) else None,
    }
    if not any(facts.values()):
        return None
    return {**facts, "layer_map": _layer_map_facts(_get(config, "layer_map"), pruned)}


def _divergence_facts(config: Any, beta: float) -> dict[str, Any]:
    """The KD term: its divergence, with the formula, source and parameters of `hf_recover.base.losses.DIVERGENCES`."""
    from ..base.losses import DIVERGENCES

    name = _get(config, "divergence")
    known = DIVERGENCES.get(name) if isinstance(name, str) else None
    params = []
    for param in known.params if known else ():
        value = _get(config, param.field)
        if value is not None:
            params.append({"field": param.field, "symbol": param.symbol, "value": value})
    return {
        "beta": beta,
        "divergence": name,
        "formula": known.formula if known else None,
        "source": known.source if known else None,
        "params": params,
        "temperature": _get(config, "temperature"),
    }


def _layer_map_facts(layer_map: Any, pruned: PrunedConfig | None) -> dict[str, Any] | None:
    """`name` (None for an explicit map) and the teacher block each student block maps to, where known."""
    if layer_map is None:
        return None
    if isinstance(layer_map, list | tuple):
        return {"name": None, "teacher_blocks": list(layer_map)}
    if layer_map == "kept" and pruned is not None and pruned.kept_layer_indices:
        return {"name": "kept", "teacher_blocks": list(pruned.kept_layer_indices)}
    return {"name": str(layer_map), "teacher_blocks": None}


def _training_facts(
    config: Any, metrics: Mapping[str, Any], pruned: PrunedConfig | None, with_hyperparameters: bool = False
) -> dict[str, Any]:
    """The data-and-budget values that are known; the others are left out (and those Trainer's hyperparameter
    list already gives, when the card has it)."""
    facts = {
        # with a pruned config the parameters are listed with what was pruned
        "parameters": (metrics.get("student_parameters") or None) if pruned is None else None,
        "steps": metrics.get("train_steps"),
        "tokens": metrics.get("train_tokens"),
        "runtime": metrics.get("train_runtime"),
    }
    if config is not None:
        per_device, accumulation = (
            _get(config, "per_device_train_batch_size"),
            _get(config, "gradient_accumulation_steps"),
        )
        world, accumulation = _get(config, "world_size") or 1, accumulation or 1
        batch = None
        if all(isinstance(v, int) and v > 0 for v in (per_device, accumulation, world)):
            batch = {
                "sequences": per_device * accumulation * world,
                "per_device": per_device,
                "accumulation": accumulation,
                "processes": world,
            }
        teacher_dtype = _get(config, "teacher_dtype")
        facts |= {
            "learning_rate": _get(config, "learning_rate"),
            "scheduler": _get(config, "lr_scheduler_type"),
            "batch": batch,
            "precision": "bf16" if _get(config, "bf16") else "fp16" if _get(config, "fp16") else None,
            "teacher_dtype": teacher_dtype if teacher_dtype != "auto" else None,
            "seed": _get(config, "seed"),
        }
        if with_hyperparameters:
            for key in ("learning_rate", "scheduler", "batch", "seed"):
                facts.pop(key)
    return {key: value for key, value in facts.items() if value is not None}


def _finetuned_from_facts(trainer_run: Mapping[str, Any] | None, teacher: str | None) -> dict[str, Any] | None:
    """The model this one was fine-tuned from, when it is not the teacher the card already names."""
    name = trainer_run.get("finetuned_from") if trainer_run else None
    if not name or name == teacher:
        return None
    return {"name": name, "on_hub": _is_hub_id(name)}


def _versions() -> list[tuple[str, str]]:
    found = [("hf_recover", __version__)]
    names = ("Transformers", "PyTorch", "Datasets", "Tokenizers", "huggingface_hub")  # Trainer's card: the first 4
    for name, dist in zip(names, ("transformers", "torch", "datasets", "tokenizers", "huggingface_hub")):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append((name, metadata.version(dist)))
    return found


# -- small helpers -----------------------------------------------------------------------------------------


def _as_pruned_config(value: PrunedConfig | Mapping[str, Any] | None) -> PrunedConfig | None:
    if value is None or isinstance(value, PrunedConfig):
        return value
    if isinstance(value, Mapping):
        return PrunedConfig.from_dict(dict(value))
    raise ValueError(f"pruned_config must be a PrunedConfig or its dict, got {type(value).__name__}.")


def _get(config: Any, name: str) -> Any:
    """A field of a TrainingArguments-like object or of a dict; None when absent. Enums give their value."""
    if config is None:
        return None
    value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
    return value.value if isinstance(value, Enum) else value


_DATA_FILE = re.compile(r"\.(txt|json|jsonl|csv|tsv|parquet|arrow|md|rst|gz|zip)$", re.IGNORECASE)


def _is_hub_id(name: str) -> bool:
    """A `namespace/name` repo id, as opposed to a local path or a free-text description."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1 or _DATA_FILE.search(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
