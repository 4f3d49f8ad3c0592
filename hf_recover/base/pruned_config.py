"""`PrunedConfig`: what was pruned, written next to the weights as `pruned_config.json`.

It travels with the model (save, load, push), so that a pruned or recovered model always knows
its teacher and which teacher block each of its blocks came from: the trainer's exact `kept`
layer map is read from here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .constants import PRUNED_CONFIG_NAME
from .version import __version__


@dataclass
class PrunedConfig:
    """Description of a structural pruning of `teacher` into a student.

    Block indices are 0-based. `kept_layer_indices[i]` is the teacher block that student block `i`
    was copied from, so it is also the exact student -> teacher layer map. Several prunings (depth
    then width, say) compose into one config with `then`.
    """

    teacher_name_or_path: str | None = None
    teacher_revision: str | None = None
    architecture: str | None = None
    teacher_num_layers: int = 0
    kept_layer_indices: list[int] = field(default_factory=list)
    teacher_intermediate_sizes: list[int] = field(default_factory=list)
    student_intermediate_sizes: list[int] = field(default_factory=list)
    teacher_hidden_size: int | None = None
    student_hidden_size: int | None = None
    teacher_attention_heads: list[int] = field(default_factory=list)
    """Query heads of every teacher block (empty in configs written before heads could be pruned)."""
    student_attention_heads: list[int] = field(default_factory=list)
    """Query heads of every student block, in student block order."""
    teacher_num_parameters: int | None = None
    student_num_parameters: int | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    """One entry per pruning operation, in order: `{"type": "depth"|"width", "method": ..., ...}`."""
    data: str | None = None
    """Description of the calibration data used to score blocks or neurons, if any."""
    license: str | None = None
    hf_recover_version: str = __version__

    def __post_init__(self):
        n = self.teacher_num_layers
        if n < 0:
            raise ValueError(f"teacher_num_layers must be >= 0, got {n}.")
        kept = list(self.kept_layer_indices)
        bad = [i for i in kept if not 0 <= i < n]
        if bad:
            raise ValueError(f"kept_layer_indices {bad} are outside the teacher's blocks 0..{n - 1}.")
        if len(set(kept)) != len(kept):
            raise ValueError(f"kept_layer_indices has duplicates: {kept}.")
        if self.student_intermediate_sizes and len(self.student_intermediate_sizes) != len(kept):
            raise ValueError(
                f"student_intermediate_sizes has {len(self.student_intermediate_sizes)} entries but the student "
                f"has {len(kept)} blocks; give one MLP size per kept block."
            )
        if self.student_attention_heads and len(self.student_attention_heads) != len(kept):
            raise ValueError(
                f"student_attention_heads has {len(self.student_attention_heads)} entries but the student has "
                f"{len(kept)} blocks; give one query-head count per kept block."
            )

    # -- what the trainer and the model card read -------------------------------------------------

    @property
    def num_student_layers(self) -> int:
        return len(self.kept_layer_indices)

    @property
    def removed_layer_indices(self) -> list[int]:
        kept = set(self.kept_layer_indices)
        return [i for i in range(self.teacher_num_layers) if i not in kept]

    @property
    def pruning_types(self) -> list[str]:
        """`["depth"]`, `["width"]` or both, in the order they were applied."""
        return list(dict.fromkeys(step["type"] for step in self.steps))

    @property
    def method(self) -> str | None:
        """The pruning methods applied, in order, e.g. `"depth:importance+width:maw"`."""
        if not self.steps:
            return None
        return "+".join(f"{step['type']}:{step.get('method', 'manual')}" for step in self.steps)

    @property
    def scores(self) -> dict[str, Any]:
        """Scores recorded by each step (block importance, per-layer neuron score summaries)."""
        return {f"{i}:{step['type']}": step["scores"] for i, step in enumerate(self.steps) if step.get("scores")}

    def teacher_layer_for(self, student_block: int) -> int:
        """The teacher block that student block `student_block` was copied from."""
        n = self.num_student_layers
        if not 0 <= student_block < n:
            raise ValueError(f"student block {student_block} is out of range: the student has blocks 0..{n - 1}.")
        return self.kept_layer_indices[student_block]

    def layer_map(self) -> list[int]:
        """`layer_map()[i]` is the teacher block aligned with student block `i` (the `kept` map)."""
        return list(self.kept_layer_indices)

    # -- composition --------------------------------------------------------------------------------

    def then(self, later: PrunedConfig) -> PrunedConfig:
        """Compose: `later` pruned the student that `self` describes; the result describes both."""
        if later.teacher_num_layers != self.num_student_layers:
            raise ValueError(
                f"Cannot compose: the later pruning starts from a {later.teacher_num_layers}-block model but this "
                f"pruning produced {self.num_student_layers} blocks."
            )
        return PrunedConfig(
            teacher_name_or_path=self.teacher_name_or_path,
            teacher_revision=self.teacher_revision,
            architecture=self.architecture,
            teacher_num_layers=self.teacher_num_layers,
            kept_layer_indices=[self.kept_layer_indices[i] for i in later.kept_layer_indices],
            teacher_intermediate_sizes=list(self.teacher_intermediate_sizes),
            student_intermediate_sizes=list(later.student_intermediate_sizes),
            teacher_hidden_size=self.teacher_hidden_size,
            student_hidden_size=later.student_hidden_size,
            teacher_attention_heads=list(self.teacher_attention_heads),
            student_attention_heads=list(later.student_attention_heads),
            teacher_num_parameters=self.teacher_num_parameters,
            student_num_parameters=later.student_num_parameters,
            steps=[*self.steps, *later.steps],
            data="; ".join(d for d in dict.fromkeys([self.data, later.data]) if d) or None,
            license=self.license or later.license,
        )

    # -- serialisation, as PEFT configs do ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields plus the derived `removed_layer_indices` and `method`, JSON-ready."""
        out = asdict(self)
        out["removed_layer_indices"] = self.removed_layer_indices
        out["method"] = self.method
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunedConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"removed_layer_indices", "method"}
        if unknown:
            raise ValueError(f"Unknown PrunedConfig fields {sorted(unknown)}; is this a pruned_config.json?")
        config = cls(**{k: v for k, v in data.items() if k in known})
        if "removed_layer_indices" in data and list(data["removed_layer_indices"]) != config.removed_layer_indices:
            raise ValueError(
                f"removed_layer_indices {data['removed_layer_indices']} do not match kept_layer_indices "
                f"{config.kept_layer_indices} for a {config.teacher_num_layers}-block teacher."
            )
        return config

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `pruned_config.json` (sorted, indented JSON) into `save_directory`; return its path."""
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_directory {directory} is a file; give a folder.")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / PRUNED_CONFIG_NAME
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> PrunedConfig:
        """Read `pruned_config.json` from a local folder (or the file itself) or from a Hub repo id."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            path = path / PRUNED_CONFIG_NAME
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} does not exist: this folder holds no pruned model description. Prune with "
                    "hf_recover.prune_depth/prune_width and save with save_pretrained to create one."
                )
        elif not path.is_file():
            name = str(pretrained_model_name_or_path)
            if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a local path, not a Hub repo id
                raise FileNotFoundError(f"No such folder or file: {name}.")
            from huggingface_hub import hf_hub_download

            path = Path(
                hf_hub_download(
                    name,
                    PRUNED_CONFIG_NAME,
                    revision=revision,
                    token=token,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                )
            )
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload pruned_config.json",
    ):
        """Upload `pruned_config.json` to `repo_id` (created if missing) in one commit."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_file(
            path_or_fileobj=self.to_json_string().encode("utf-8"),
            path_in_repo=PRUNED_CONFIG_NAME,
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message,
        )

    @classmethod
    def find_for(cls, model_or_path: Any, **hub_kwargs: Any) -> PrunedConfig | None:
        """The `PrunedConfig` that travels with a model, or None when it has none: the one way to find it.

        `model_or_path` is
        - a model: the `PrunedConfig` attached by pruning or loading (`model.pruned_config`), else the
          `pruned_config.json` in the local folder it was loaded from (`config.name_or_path`; a model loaded from
          the Hub is not looked up there again);
        - a local folder: its `pruned_config.json`;
        - a Hub repo id: its `pruned_config.json`, downloaded with `hub_kwargs` (`revision`, `token`, `cache_dir`,
          `local_files_only`).
        Only a missing file means None (including a Hub file that cannot be found, or fetched while offline); a
        file that is not valid JSON or not a pruned config raises, as does a local path that does not exist.
        """
        if not isinstance(model_or_path, (str, os.PathLike)):
            attached = getattr(model_or_path, "pruned_config", None)
            if isinstance(attached, PrunedConfig):
                return attached
            config = getattr(model_or_path, "config", None)
            source = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
            if not source or not Path(source).is_dir():
                return None
            model_or_path = source
        path = Path(model_or_path)
        if path.is_dir():
            return cls.from_pretrained(path) if (path / PRUNED_CONFIG_NAME).is_file() else None
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return cls.from_pretrained(model_or_path, **hub_kwargs)
        except EntryNotFoundError:  # the repo has no pruned_config.json, or it is not cached and we are offline
            return None
