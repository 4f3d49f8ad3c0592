"""Model cards for recovered models, and pushing a recovered model to the Hugging Face Hub.

`generate_model_card` renders `model_cards/recovered_model.md` (a Jinja template shipped in the wheel)
into a `huggingface_hub.ModelCard`; it is pure. `save_model_card` writes it as `README.md`, merging
into a README that is already there. `push_recovered` validates a saved folder and sends it in one
commit. The trainer's save hooks and `push_to_hub` call these.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from enum import Enum
from fnmatch import fnmatch
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .constants import PRUNED_CONFIG_NAME
from .evaluation import recovery_metrics
from .pruned_config import PrunedConfig

logger = logging.getLogger(__name__)

CARD_TEMPLATE = "recovered_model.md"
CARD_NAME = "README.md"
BEGIN_MARKER = "<!-- hf_recover:begin -->"
END_MARKER = "<!-- hf_recover:end -->"
"""Our section of a README lies between these markers; the user's text outside them is never touched."""

BASE_TAGS = ("hf-recover",)
DEFAULT_COMMIT_MESSAGE = "Upload model recovered with hf_recover"

# What a push sends: top-level files only (checkpoint-*/ and other subfolders never go), by name.
MODEL_WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors")
WEIGHT_PATTERNS = (*MODEL_WEIGHT_PATTERNS, "adapter_model.safetensors")
PUSH_PATTERNS = (
    *WEIGHT_PATTERNS,
    "model.safetensors.index.json",
    "config.json",
    "adapter_config.json",
    "generation_config.json",
    PRUNED_CONFIG_NAME,
    CARD_NAME,
    "projectors.safetensors",  # only there when the user asked to export them (`save_projectors`)
    # tokenizer files, as `PreTrainedTokenizer(Fast).save_pretrained` writes them
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

_MISSING = "—"  # an unknown cell inside a table that has other values


class HubPushError(RuntimeError):
    """A push to the Hub failed (network, authentication or permission); the local folder is intact."""


# -- model card ------------------------------------------------------------------------------------------


def generate_model_card(
    *,
    pruned_config: PrunedConfig | Mapping[str, Any] | None = None,
    config: Any = None,
    metrics: Mapping[str, Any] | None = None,
    datasets: str | Iterable[str] | None = None,
    model_name: str | None = None,
    hub_model_id: str | None = None,
) -> ModelCard:
    """Render the model card of a recovered model. Pure: reads no file, writes nothing.

    Args:
        pruned_config: what was pruned (a `PrunedConfig` or its dict). Gives the teacher (`base_model`),
            the kept/removed blocks, per-block MLP sizes, parameter counts and the licence.
        config: the training configuration, a `DistillationConfig`/`TrainingArguments` or a dict with the
            same field names (`alpha`, `beta`, `gamma`, `delta`, `temperature`, `divergence`,
            `skew_lambda`, `jsd_beta`, `alignment`, `layer_map`, `projector`, `learning_rate`, ...).
            Missing fields are left out of the card.
        metrics: what recovery achieved, every key optional::

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

    Returns:
        A `huggingface_hub.ModelCard` whose metadata has `base_model` (the teacher), `library_name`,
        `pipeline_tag`, `tags`, `datasets` and `license` where known. A value that is not known leaves
        its line or table out of the card.
    """
    pruned = _as_pruned_config(pruned_config)
    metrics = dict(metrics or {})
    dataset_names = _as_list(datasets)
    teacher = pruned.teacher_name_or_path if pruned else None
    distillation = _is_distillation(config)

    tags = [*BASE_TAGS]
    if pruned is not None:
        tags += ["pruned", *(f"{kind}-pruning" for kind in pruned.pruning_types)]
    if distillation:
        tags.append("knowledge-distillation")
    hub_datasets = [name for name in dataset_names if _is_hub_id(name)]
    card_data = ModelCardData(
        base_model=teacher if teacher and _is_hub_id(teacher) else None,
        datasets=hub_datasets or None,
        library_name="transformers",
        license=pruned.license if pruned and pruned.license else None,
        pipeline_tag="text-generation",
        tags=tags,
    )
    loss_formula, loss_rows = _loss_context(config, pruned)
    training_lines = _training_lines(config, metrics)
    if pruned is None and metrics.get("student_parameters"):  # otherwise listed with what was pruned
        training_lines.insert(0, f"Parameters: {_params(metrics['student_parameters'])}")
    context = {
        "title": _title(model_name, hub_model_id, teacher),
        "teacher": teacher,
        "teacher_link": _teacher_link(teacher, pruned.teacher_revision if pruned else None),
        "pruning_types": [f"{kind} pruning" for kind in pruned.pruning_types] if pruned else [],
        "distillation": distillation,
        "pruning": _pruning_context(pruned, metrics) if pruned else None,
        "loss_formula": loss_formula,
        "loss_rows": loss_rows,
        "dataset_lines": _dataset_lines(dataset_names),
        "training_lines": training_lines,
        "result_rows": _result_rows(metrics.get("perplexity")),
        "usage": _usage(pruned, hub_model_id),
        "versions": _versions(),
    }
    content = _template().render(card_data=card_data.to_yaml(), **context)
    return ModelCard(content)


def save_model_card(
    output_dir: str | os.PathLike,
    *,
    pruned_config: PrunedConfig | Mapping[str, Any] | None = None,
    config: Any = None,
    metrics: Mapping[str, Any] | None = None,
    datasets: str | Iterable[str] | None = None,
    model_name: str | None = None,
    hub_model_id: str | None = None,
) -> Path:
    """Write the card of `generate_model_card` as `output_dir/README.md`; return its path.

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
    if pruned_config is None and (directory / PRUNED_CONFIG_NAME).is_file():
        pruned_config = PrunedConfig.from_pretrained(directory)
    card = generate_model_card(
        pruned_config=pruned_config,
        config=config,
        metrics=metrics,
        datasets=datasets,
        model_name=model_name,
        hub_model_id=hub_model_id,
    )
    path = directory / CARD_NAME
    if path.is_file():
        merged = _merge_into_existing(path, card)
        if merged is None:
            return path
        card = merged
    directory.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path


def _merge_into_existing(path: Path, ours: ModelCard) -> ModelCard | None:
    text = path.read_text(encoding="utf-8")
    try:
        theirs = ModelCard(text, ignore_metadata_errors=True)
    except (ValueError, yaml.YAMLError) as err:  # a malformed header: merging would lose something
        logger.warning("Not updating %s: its metadata header cannot be read (%s). Fix it to get the card.", path, err)
        return None
    body = theirs.text
    begins, ends = body.count(BEGIN_MARKER), body.count(END_MARKER)
    section = _our_section(ours.text)
    if begins == ends == 0:
        body = body.rstrip() + "\n\n" + section + "\n" if body.strip() else ours.text
    elif begins == ends == 1 and body.index(BEGIN_MARKER) < body.index(END_MARKER):
        start, end = body.index(BEGIN_MARKER), body.index(END_MARKER) + len(END_MARKER)
        body = body[:start] + section + body[end:]
    else:
        logger.warning(
            "Not updating %s: it has %d '%s' and %d '%s' markers; keep exactly one pair around the hf_recover "
            "section (or none) to get the card updated.",
            path,
            begins,
            BEGIN_MARKER,
            ends,
            END_MARKER,
        )
        return None
    data = _merge_metadata(theirs.data.to_dict(), ours.data.to_dict())
    original_order = list(theirs.data.to_dict())
    card_data = ModelCardData(ignore_metadata_errors=True, **data)
    return ModelCard(f"---\n{card_data.to_yaml(original_order=original_order)}\n---\n{body}")


def _our_section(text: str) -> str:
    start, end = text.index(BEGIN_MARKER), text.index(END_MARKER) + len(END_MARKER)
    return text[start:end]


def _merge_metadata(theirs: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Ours fills and extends; lists (tags, datasets) are unioned, theirs first; their other keys stay."""
    merged = dict(theirs)
    for key, value in ours.items():
        old = merged.get(key)
        if isinstance(value, list) or isinstance(old, list):
            merged[key] = list(dict.fromkeys([*_as_list(old), *_as_list(value)]))
        else:
            merged[key] = value
    return merged


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
    return env.from_string(source)


# -- what goes into the card ------------------------------------------------------------------------------


def _pruning_context(pruned: PrunedConfig, metrics: Mapping[str, Any]) -> dict[str, Any]:
    lines = []
    n_teacher, kept = pruned.teacher_num_layers, pruned.kept_layer_indices
    if pruned.steps:
        lines.append("Pruning: " + ", then ".join(_describe_step(step) for step in pruned.steps))
    if n_teacher and kept:
        lines.append(f"Blocks: {len(kept)} of the teacher's {n_teacher} transformer blocks kept")
        if pruned.removed_layer_indices:
            lines.append(f"Kept teacher blocks: {_indices(kept)}")
            lines.append(f"Removed teacher blocks: {_indices(pruned.removed_layer_indices)}")
    rows = _mlp_rows(pruned)
    teacher_hidden, student_hidden = pruned.teacher_hidden_size, pruned.student_hidden_size
    if teacher_hidden and student_hidden and teacher_hidden != student_hidden:
        lines.append(f"Hidden size: {teacher_hidden} → {student_hidden}")
    elif student_hidden:
        lines.append(f"Hidden size: {student_hidden}" + (" (unchanged)" if teacher_hidden else ""))
    teacher_params = metrics.get("teacher_parameters") or pruned.teacher_num_parameters
    student_params = metrics.get("student_parameters") or pruned.student_num_parameters
    if teacher_params and student_params:
        change = (student_params - teacher_params) / teacher_params
        lines.append(f"Parameters: {_params(teacher_params)} → {_params(student_params)} ({change:+.1%})")
    elif student_params:
        lines.append(f"Parameters: {_params(student_params)}")
    if pruned.data:
        lines.append(f"Calibration data: {pruned.data}")
    if pruned.license:
        lines.append(f"License: {pruned.license}, inherited from the teacher")
    return {"lines": lines, "mlp_rows": rows}


def _describe_step(step: Mapping[str, Any]) -> str:
    """One step in words, e.g. "depth pruning (method `importance`, removed blocks [3, 5])"."""
    details = [f"method `{step['method']}`"] if step.get("method") else []
    if step.get("score"):
        details.append(f"score `{step['score']}`")
    if step.get("removed"):
        details.append(f"removed blocks {_indices(step['removed'])}")
    if _positive(step.get("n_blocks")) and step["n_blocks"] > 1:
        details.append(f"{step['n_blocks']} contiguous blocks")
    if step.get("pruning_ratio") is not None:
        details.append(f"pruning ratio {_number(step['pruning_ratio'])}")
    if step.get("expansion_rate") is not None:
        details.append(f"expansion rate {_number(step['expansion_rate'])}")
    if _positive(step.get("divisor")) and step["divisor"] > 1:
        details.append(f"sizes rounded to multiples of {step['divisor']}")
    layers = step.get("layers")
    if layers and list(layers) != list(range(len(layers))):  # all blocks from 0 up: nothing worth saying
        details.append(f"blocks {_indices(layers)}")
    handled = {"type", "method", "scores", "score", "removed", "n_blocks", "pruning_ratio", "expansion_rate"}
    for key, value in step.items():  # anything else a future step records, when it reads as one short value
        if key not in handled | {"divisor", "layers"} and isinstance(value, bool | int | float | str):
            details.append(f"{key.replace('_', ' ')} {_number(value)}")
    return f"{step.get('type', 'unknown')} pruning" + (f" ({', '.join(details)})" if details else "")


def _mlp_rows(pruned: PrunedConfig) -> list[dict[str, Any]]:
    """One row per student block when width pruning changed some MLP size; else none."""
    student_sizes, teacher_sizes = pruned.student_intermediate_sizes, pruned.teacher_intermediate_sizes
    kept = pruned.kept_layer_indices
    if not student_sizes or len(student_sizes) != len(kept):
        return []
    teacher_for = [teacher_sizes[t] if len(teacher_sizes) == pruned.teacher_num_layers else None for t in kept]
    if "width" not in pruned.pruning_types and all(t is None or t == s for t, s in zip(teacher_for, student_sizes)):
        return []
    return [
        {
            "student": i,
            "teacher": t,
            "teacher_size": _MISSING if t_size is None else t_size,
            "student_size": s_size,
            "kept": _MISSING if not t_size else f"{s_size / t_size:.0%}",
        }
        for i, (t, t_size, s_size) in enumerate(zip(kept, teacher_for, student_sizes))
    ]


def _loss_context(config: Any, pruned: PrunedConfig | None) -> tuple[str | None, list[dict[str, str]]]:
    if config is None:
        return None, []
    rows, formula = [], []
    alpha, beta, gamma, delta = (_get(config, name) for name in ("alpha", "beta", "gamma", "delta"))
    temperature = _get(config, "temperature")
    if _positive(alpha):
        formula.append("α·CE")
        rows.append(_loss_row("cross-entropy (CE)", f"α = {_number(alpha)}", "next-token loss"))
    if _positive(beta):
        formula.append("β·T²·KD")
        divergence = _get(config, "divergence")
        details = [f"`{divergence}` between the teacher's and the student's token distributions"] if divergence else []
        if divergence in ("skew_forward_kl", "skew_reverse_kl") and _get(config, "skew_lambda") is not None:
            details.append(f"skew λ = {_number(_get(config, 'skew_lambda'))} (DistiLLM)")
        if divergence == "generalized_jsd" and _get(config, "jsd_beta") is not None:
            details.append(f"JSD β = {_number(_get(config, 'jsd_beta'))} (GKD)")
        if temperature is not None:
            details.append(f"temperature T = {_number(temperature)}, scaled by T²")
        rows.append(_loss_row("distillation (KD)", f"β = {_number(beta)}", "; ".join(details)))
    layer_map = _describe_layer_map(_get(config, "layer_map"), pruned)
    if _positive(gamma):
        formula.append("γ·align")
        details = [f"`{_get(config, 'alignment')}` distance of hidden states"] if _get(config, "alignment") else []
        details += [layer_map] if layer_map else []
        if _get(config, "projector") is not None:
            details.append(f"projector `{_get(config, 'projector')}`")
        rows.append(_loss_row("hidden alignment", f"γ = {_number(gamma)}", "; ".join(details)))
    if _positive(delta):
        formula.append("δ·FDD")
        details = ["cosine of the block-to-block changes of student and teacher hidden states (Gong et al., 2025)"]
        details += [layer_map] if layer_map else []
        rows.append(_loss_row("feature dynamics (FDD)", f"δ = {_number(delta)}", "; ".join(details)))
    return (" + ".join(formula) or None), rows


def _loss_row(term: str, weight: str, details: str) -> dict[str, str]:
    return {"term": term, "weight": weight, "details": details or _MISSING}


def _describe_layer_map(layer_map: Any, pruned: PrunedConfig | None) -> str | None:
    if layer_map is None:
        return None
    if isinstance(layer_map, list | tuple):
        return f"explicit layer map, student blocks ← teacher blocks {_indices(layer_map, sort=False)}"
    if layer_map == "kept" and pruned is not None and pruned.kept_layer_indices:
        return f"layer map `kept`, student blocks ← teacher blocks {_indices(pruned.kept_layer_indices, sort=False)}"
    return f"layer map `{layer_map}`"


def _dataset_lines(names: list[str]) -> list[str]:
    if not names:
        return []
    shown = [f"[{n}](https://huggingface.co/datasets/{n})" if _is_hub_id(n) else n for n in names]
    return [f"Recovery data: {'; '.join(shown)}"]


def _training_lines(config: Any, metrics: Mapping[str, Any]) -> list[str]:
    lines = []
    if metrics.get("train_steps") is not None:
        lines.append(f"Optimizer steps: {int(metrics['train_steps']):,}")
    if metrics.get("train_tokens") is not None:
        lines.append(f"Training tokens: {int(metrics['train_tokens']):,}")
    if metrics.get("train_runtime") is not None:
        lines.append(f"Training time: {_duration(float(metrics['train_runtime']))}")
    if config is None:
        return lines
    learning_rate, scheduler = _get(config, "learning_rate"), _get(config, "lr_scheduler_type")
    if learning_rate is not None:
        lines.append(f"Learning rate: {_number(learning_rate)}" + (f", `{scheduler}` schedule" if scheduler else ""))
    per_device, accumulation = _get(config, "per_device_train_batch_size"), _get(config, "gradient_accumulation_steps")
    world = _get(config, "world_size") or 1
    accumulation = accumulation or 1
    if all(isinstance(v, int) and v > 0 for v in (per_device, accumulation, world)):
        line = f"Batch size: {per_device * accumulation * world} sequences per step"
        parts = [f"{per_device} per device"]
        parts += [f"{accumulation} accumulation steps"] if accumulation > 1 else []
        parts += [f"{world} processes"] if world > 1 else []
        if len(parts) > 1:
            line += f" ({' × '.join(parts)})"
        lines.append(line)
    precision = "bf16" if _get(config, "bf16") else "fp16" if _get(config, "fp16") else None
    if precision:
        lines.append(f"Mixed precision: {precision}")
    if _get(config, "teacher_dtype") not in (None, "auto"):
        lines.append(f"Teacher dtype: {_get(config, 'teacher_dtype')}")
    if _get(config, "seed") is not None:
        lines.append(f"Seed: {_get(config, 'seed')}")
    return lines


def _result_rows(perplexity: Any) -> list[dict[str, str]]:
    if not isinstance(perplexity, Mapping):
        return []
    rows = []
    for split, values in perplexity.items():
        if not isinstance(values, Mapping):
            continue
        teacher, pruned, recovered = (values.get(k) for k in ("teacher", "pruned", "recovered"))
        if teacher is None and pruned is None and recovered is None:
            continue
        recovery = retention = _MISSING
        if None not in (teacher, pruned, recovered):
            try:
                scores = recovery_metrics(float(teacher), float(pruned), float(recovered))
            except ValueError:  # a non-positive perplexity: show the values, not a ratio
                scores = {}
            if math.isfinite(scores.get("recovery", math.nan)):
                recovery = f"{scores['recovery']:.1%}"
            if math.isfinite(scores.get("retention", math.nan)):
                retention = f"{scores['retention']:.1%}"
        elif teacher is not None and recovered is not None and float(recovered) > 0:
            retention = f"{float(teacher) / float(recovered):.1%}"
        rows.append(
            {
                "split": str(split),
                "teacher": _ppl(teacher),
                "pruned": _ppl(pruned),
                "recovered": _ppl(recovered),
                "recovery": recovery,
                "retention": retention,
            }
        )
    return rows


def _usage(pruned: PrunedConfig | None, model_id: str | None) -> str:
    model_id = model_id or "path/to/this/model"
    sizes = pruned.student_intermediate_sizes if pruned else []
    if len(set(sizes)) > 1:
        imports = "from transformers import AutoTokenizer\n\nfrom hf_recover import load_pruned\n"
        load = (
            "# its blocks have different MLP sizes: plain from_pretrained cannot build them, load_pruned can\n"
            "model = load_pruned(model_id)"
        )
    else:
        imports = "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        load = "model = AutoModelForCausalLM.from_pretrained(model_id)"
    return (
        f"{imports}\n"
        f"model_id = {json.dumps(model_id)}\n"
        "tokenizer = AutoTokenizer.from_pretrained(model_id)\n"
        f"{load}\n\n"
        'inputs = tokenizer("The quick brown fox", return_tensors="pt")\n'
        "outputs = model.generate(**inputs, max_new_tokens=32)\n"
        "print(tokenizer.decode(outputs[0], skip_special_tokens=True))"
    )


def _versions() -> list[tuple[str, str]]:
    from . import __version__

    found = [("hf_recover", __version__)]
    for name, dist in (("Transformers", "transformers"), ("PyTorch", "torch"), ("huggingface_hub", "huggingface_hub")):
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


def _is_distillation(config: Any) -> bool:
    """False only when the config says that no teacher term (β, γ, δ) is active."""
    weights = [_get(config, name) for name in ("beta", "gamma", "delta")]
    if config is None or all(w is None for w in weights):
        return True
    return any(_positive(w) for w in weights)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


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


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [v for v in value if v is not None]


def _title(model_name: str | None, hub_model_id: str | None, teacher: str | None) -> str:
    if model_name:
        return model_name
    if hub_model_id:
        return hub_model_id.split("/")[-1]
    if teacher:
        return f"{teacher.rstrip('/').split('/')[-1]}, pruned and recovered"
    return "Recovered model"


def _teacher_link(teacher: str | None, revision: str | None) -> str | None:
    if not teacher:
        return None
    link = f"[{teacher}](https://huggingface.co/{teacher})" if _is_hub_id(teacher) else f"`{teacher}`"
    return link + (f" (revision `{revision}`)" if revision else "")


def _indices(values: Iterable[int], *, sort: bool = True) -> str:
    values = sorted(values) if sort else list(values)
    return "[" + ", ".join(str(v) for v in values) + "]"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _params(count: int | float) -> str:
    count = float(count)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return f"{count:.0f}"


def _ppl(value: Any) -> str:
    if value is None:
        return _MISSING
    value = float(value)
    if not math.isfinite(value):
        return "∞" if value > 0 else _MISSING
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


# -- push ------------------------------------------------------------------------------------------------


def push_recovered(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
):
    """Push a saved recovered model to the Hub repo `repo_id` in one commit; return its `CommitInfo`.

    Sends only the top-level files a user needs: the safetensors weights (or a PEFT adapter), `config.json`,
    `generation_config.json`, the tokenizer files, `pruned_config.json` and `README.md` (rendered in memory
    from `pruned_config.json` when the folder has none). Checkpoint
    subfolders, optimizer and scheduler states, `training_args.bin` and other training leftovers stay
    local. Everything is validated before anything is sent: the folder and its weights exist, `repo_id` is
    a valid repo id, and `pruned_config.json` (when present) agrees with the weights and `config.json`.
    The repo is created if it does not exist (`private` applies then). The folder is only read.

    Raises:
        FileNotFoundError: the folder, its weights or its `config.json` are missing.
        ValueError: `repo_id` is invalid, or `pruned_config.json` does not match the model.
        HubPushError: the Hub could not be reached, refused the token, or the token may not write to
            `repo_id`. The local folder is unchanged: fix the cause and call again to retry.
    """
    folder = Path(folder)
    files = _files_to_push(folder)
    _validate_repo_id(repo_id)
    _check_pruned_config(folder, files)

    from huggingface_hub import CommitOperationAdd, HfApi

    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    if CARD_NAME not in files:  # the card travels with the model even if none was saved; the folder is not touched
        pruned = PrunedConfig.from_pretrained(folder) if PRUNED_CONFIG_NAME in files else None
        card = generate_model_card(pruned_config=pruned, hub_model_id=repo_id)
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card).encode("utf-8")))
    message = commit_message or DEFAULT_COMMIT_MESSAGE
    names = [op.path_in_repo for op in operations]
    logger.info("Pushing %d files from %s to the Hub repo %s: %s", len(names), folder, repo_id, ", ".join(names))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=message, repo_type="model", revision=revision)
    except _network_errors() as err:
        raise HubPushError(_push_failure_message(err, folder, repo_id, token)) from err


def _files_to_push(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder. Give the folder a recovered model was saved to "
            "(trainer.save_model(output_dir) or model.save_pretrained(output_dir))."
        )
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    files = [name for name in names if any(fnmatch(name, pattern) for pattern in PUSH_PATTERNS)]
    if not any(fnmatch(name, pattern) for name in files for pattern in WEIGHT_PATTERNS):
        found = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".safetensors"))]
        hint = f" (found only {', '.join(found)})" if found else ""
        raise FileNotFoundError(
            f"{folder} holds no safetensors weights{hint}: expected model.safetensors, sharded "
            "model-0000x-of-0000y.safetensors or adapter_model.safetensors. Save the model with "
            "save_pretrained(output_dir) (safe_serialization=True, the default) before pushing."
        )
    is_adapter = "adapter_model.safetensors" in files
    needed = "adapter_config.json" if is_adapter else "config.json"
    if needed not in files:
        raise FileNotFoundError(
            f"{folder} has weights but no {needed}; save the model with save_pretrained(output_dir), "
            "which writes both."
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing = sorted(shards - set(files))
        if missing:
            raise FileNotFoundError(f"{index} lists weight shards that are not in the folder: {', '.join(missing)}.")
    return files


def _validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"Invalid Hub repo id {repo_id!r}: {err} Use 'your-username/model-name' (letters, digits, '-', '_', '.')."
        ) from None


def _check_pruned_config(folder: Path, files: list[str]) -> None:
    """`pruned_config.json`, when present, must describe the model in the folder: same blocks, same MLP sizes."""
    if PRUNED_CONFIG_NAME not in files:
        return
    path = folder / PRUNED_CONFIG_NAME
    try:
        pruned = PrunedConfig.from_pretrained(path)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a valid pruned config: {err}") from None
    n_blocks = pruned.num_student_layers
    problems = []
    if "config.json" in files:
        model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        model_config = model_config.get("text_config", model_config)  # multimodal wrappers nest the LM config
        layers = model_config.get("num_hidden_layers")
        if layers is not None and layers != n_blocks:
            problems.append(f"config.json has num_hidden_layers={layers}")
        expected = pruned.student_intermediate_sizes
        for key in ("intermediate_size", "hf_recover_intermediate_sizes"):  # the latter: see `load_pruned`
            sizes = model_config.get(key)
            if isinstance(sizes, list) and expected and sizes != expected:
                problems.append(f"config.json has per-block {key} {sizes}")
    weight_blocks, weight_sizes = _blocks_in_weights(folder, files)
    if weight_blocks is not None and weight_blocks != n_blocks:
        problems.append(f"the weights hold {weight_blocks} transformer blocks")
    expected_sizes = pruned.student_intermediate_sizes
    if weight_sizes and expected_sizes and weight_blocks == n_blocks and weight_sizes != expected_sizes:
        problems.append(f"the weights have MLP sizes {weight_sizes}")
    if problems:
        raise ValueError(
            f"{path} does not match the model in {folder}: it describes {n_blocks} blocks "
            f"(teacher blocks {pruned.kept_layer_indices}) with MLP sizes {expected_sizes or 'unrecorded'}, but "
            + "; ".join(problems)
            + ". Save the pruned_config.json of this very model (trainer.save_model writes both), then push again."
        )


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _blocks_in_weights(folder: Path, files: list[str]) -> tuple[int | None, list[int]]:
    """Number of transformer blocks and per-block MLP sizes, read from the safetensors headers only."""
    from safetensors import safe_open

    shards = [name for name in files if any(fnmatch(name, p) for p in MODEL_WEIGHT_PATTERNS)]
    if not shards:  # an adapter: the base weights are elsewhere
        return None, []
    blocks: set[int] = set()
    sizes: dict[int, int] = {}
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                match = _LAYER_KEY.search(key)
                if not match:
                    continue
                block = int(match.group(1))
                blocks.add(block)
                if key.endswith("mlp.up_proj.weight"):
                    sizes[block] = handle.get_slice(key).get_shape()[0]
    if not blocks:
        return None, []
    n = max(blocks) + 1
    return n, [sizes[i] for i in range(n)] if len(sizes) == n else []


def _network_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the push did not go through: HTTP status, connection, timeout, I/O."""
    errors: list[type[BaseException]] = [OSError]
    from huggingface_hub.errors import HfHubHTTPError

    errors.append(HfHubHTTPError)
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(__import__(module), name))
    return tuple(errors)


def _push_failure_message(err: BaseException, folder: Path, repo_id: str, token: str | None) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        cause = "the Hub rejected the token (HTTP 401): log in with `hf auth login` or pass a valid token"
    elif status == 403:
        cause = f"the token may not write to {repo_id} (HTTP 403): use a token with write access to that namespace"
    elif status == 404:
        cause = f"the repo or revision was not found (HTTP 404): check the namespace and branch of {repo_id}"
    elif status is not None:
        cause = f"the Hub answered HTTP {status}"
    else:
        cause = "the Hub could not be reached (network error)"
    detail = str(err)
    if token:
        detail = detail.replace(token, "***")
    return (
        f"Pushing {folder} to the Hub repo {repo_id!r} failed: {cause}. [{type(err).__name__}: {detail}] "
        "The local folder was not changed; fix the cause and push again to retry."
    )
