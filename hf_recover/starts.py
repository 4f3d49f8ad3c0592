"""The pruned start of a recovery, built once: the same spec on the same teacher and calibration blocks gives the
same student, so a second run reads it back instead of scoring, cutting and healing again.

Healing is most of a run's fixed cost (the demo's block-local heal takes about four minutes on 2 CPU cores).
`cached_build` keys a start by what decides it (the teacher's class, configuration and weights, the prune spec, the
calibration blocks' exact tokens, the batch settings, torch's and hf_recover's versions), saves it under
hf_recover's cache (`cache_root()/starts/<key>`) with its `pruned_config.json`, and loads it from there with
`load_pruned` on the next run. A damaged entry is built again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base.defaults.assets import cache_root
from .base.loading import load_pruned
from .base.pruned_config import PrunedConfig
from .base.version import __version__
from .distill.evaluation_cache import model_fingerprint
from .distill.fingerprints import dataset_fingerprint, key_digest

logger = logging.getLogger(__name__)
FOLDER = "starts"


def cached_build(
    spec: Any,
    teacher: nn.Module,
    calibration: Any,
    *,
    teacher_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **build_kwargs: Any,
) -> tuple[nn.Module, PrunedConfig, bool]:
    """`spec.build(teacher, calibration, **build_kwargs)` (a `PruneSpec`), read from hf_recover's cache when built
    before from the same teacher, spec and calibration; returns `(student, pruned_config, read_from_cache)`.
    `teacher_key` (`model_fingerprint(teacher)`) spares hashing the teacher again for a second spec."""
    key = {
        "teacher": teacher_key or model_fingerprint(teacher),
        "spec": spec.to_dict(),
        "calibration": dataset_fingerprint(calibration) if calibration is not None else None,
        "build": {name: value for name, value in build_kwargs.items() if name != "block_scores"},
        "device": next(teacher.parameters()).device.type,
        "torch": torch.__version__,
        "hf_recover": __version__,
    }
    folder = Path(cache_root(cache_dir)) / FOLDER / key_digest(key)
    if (folder / "key.json").is_file():
        try:
            return (*_load(folder, teacher), True)
        except Exception as err:  # noqa: BLE001 - whatever fails to read, a damaged entry is built again and replaced
            logger.warning("The cached start in %s is damaged (%s): building it again.", folder, err)
    student, pruned_config = spec.build(teacher, calibration, **build_kwargs)
    if _is_main_process():  # one writer under torchrun; the other ranks built the same start
        try:
            _save(folder, student, pruned_config, key)
        except OSError as err:  # a read-only or full cache costs the next run a build, not this run its start
            logger.warning(
                "The pruned start could not be cached in %s (%s): the next run builds it again.", folder, err
            )
    return student, pruned_config, False


def _save(folder: Path, student: nn.Module, pruned_config: PrunedConfig, key: dict[str, Any]) -> None:
    partial = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    student.save_pretrained(partial)
    pruned_config.save_pretrained(partial)
    (partial / "key.json").write_text(json.dumps(key, sort_keys=True, default=str), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)  # whole or absent


def _is_main_process() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def _load(folder: Path, teacher: nn.Module) -> tuple[nn.Module, PrunedConfig]:
    """The start saved in `folder`, as `spec.build` returns it: the teacher's type, device, attention implementation
    and name (so that its fingerprint, and the perplexities cached under it, are the built one's), trainable."""
    parameter, config = next(teacher.parameters()), teacher.config
    student = load_pruned(folder, dtype=parameter.dtype, attn_implementation=config._attn_implementation)
    student.config._name_or_path = config._name_or_path
    student.to(parameter.device).requires_grad_(True)  # as spec.build leaves it: the student trains
    print(f"The pruned start read from the cache (built in an earlier run): {folder}")
    return student, PrunedConfig.from_pretrained(folder)
