"""Loading models: a pruned or recovered model whatever its per-block MLP sizes (`load_pruned`), a model and its
tokenizer by 'default', folder or Hub id (`load_model`), and the check that a folder's `pruned_config.json`
describes the weights next to it (`check_pruned_config_matches_weights`)."""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

from .constants import ATTENTION_HEADS_FIELD, MLP_SIZES_FIELD, PRUNED_CONFIG_NAME
from .pruned_config import PrunedConfig

DEFAULT_TEACHER_NAME = "default"
"""The name that stands for the embedded teacher (`hf_recover.load_default_teacher`) wherever a model is named."""

MODEL_WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors")
"""The file names of a saved model's safetensors weights: one file, or shards."""

HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only")
"""The `from_pretrained` keyword arguments that also say where to find `pruned_config.json`."""


def load_pruned(pretrained_model_name_or_path: str | os.PathLike, **from_pretrained_kwargs):
    """Load a pruned (or recovered) model saved with `save_pretrained`, whatever its MLP sizes and head counts.

    How to reload. transformers 5 takes a single int `intermediate_size` for Llama, Qwen2, Qwen3,
    Gemma3 and Mistral (a per-layer list fails the config's validation). So:
    - depth-pruned models, and width-pruned ones whose blocks all kept the same MLP size, reload with
      plain `AutoModelForCausalLM.from_pretrained(path)`: `prune_width` writes that size into
      `config.intermediate_size`;
    - when blocks ended with different sizes (`prune_width(..., layers=[...])`, or successive
      prunings), the config also holds the list `hf_recover_intermediate_sizes`, and the model must be
      loaded with `hf_recover.load_pruned(path)` (plain `from_pretrained` refuses the checkpoint with
      a size-mismatch error). `load_pruned` builds each block's MLP at its own size and loads the
      safetensors weights exactly, through `from_pretrained`, so its keyword arguments (`dtype`,
      `device_map`, `revision`, ...) work as usual; it also works for uniform models.
    - per-block query-head counts (`prune_width(..., heads=..., layers=[...])`) work the same way: the config
      holds `hf_recover_attention_heads` and `load_pruned` builds each block's `q_proj`/`o_proj` at its size.
    Save with `model.save_pretrained(path)` and `model.pruned_config.save_pretrained(path)` (the
    trainer's save does both). The `PrunedConfig` found next to the weights is attached to the
    returned model as `model.pruned_config`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    hub_kwargs = {k: from_pretrained_kwargs[k] for k in HUB_KWARGS if k in from_pretrained_kwargs}
    config = from_pretrained_kwargs.pop("config", None) or AutoConfig.from_pretrained(
        pretrained_model_name_or_path,
        **hub_kwargs,
        **{k: v for k, v in from_pretrained_kwargs.items() if k == "trust_remote_code"},
    )
    pruned_config = PrunedConfig.find_for(pretrained_model_name_or_path, **hub_kwargs)
    sizes = getattr(config, MLP_SIZES_FIELD, None)
    if sizes is None and pruned_config is not None and pruned_config.student_intermediate_sizes:
        sizes = pruned_config.student_intermediate_sizes
    heads = getattr(config, ATTENTION_HEADS_FIELD, None)
    if heads is None and pruned_config is not None and pruned_config.student_attention_heads:
        heads = pruned_config.student_attention_heads
    per_layer = {
        name: values
        for name, values in (("MLP sizes", sizes), ("attention head counts", heads))
        if values is not None and len(set(values)) > 1
    }
    for name, values in per_layer.items():
        if len(values) != config.num_hidden_layers:
            raise ValueError(
                f"The saved per-layer {name} ({len(values)}) do not match num_hidden_layers "
                f"({config.num_hidden_layers}) in {pretrained_model_name_or_path}: the folder is inconsistent."
            )
    if per_layer:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
        with _per_layer_shapes(model_class, per_layer.get("MLP sizes"), per_layer.get("attention head counts")):
            model = AutoModelForCausalLM.from_pretrained(
                pretrained_model_name_or_path, config=config, **from_pretrained_kwargs
            )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            pretrained_model_name_or_path, config=config, **from_pretrained_kwargs
        )
    if pruned_config is not None:
        model.pruned_config = pruned_config
    return model


@contextmanager
def _per_layer_shapes(model_class: type, sizes: list[int] | None, heads: list[int] | None):
    """While active, every decoder block of `model_class` builds its MLP at `sizes[layer_idx]` and its attention
    with `heads[layer_idx]` query heads (either may be None: the config's size for every block).

    `from_pretrained` constructs the model (on the meta device) and then loads the weights into it;
    patching the block constructor is the one place where the right shapes can be set in between.
    """
    from .anatomy import resize_attention_heads, resize_mlp  # torch: imported when a model is built

    module = sys.modules[model_class.__module__]
    layer_classes = [getattr(module, name) for name in model_class._no_split_modules if hasattr(module, name)]
    if len(layer_classes) != 1:
        raise ValueError(f"Cannot find the decoder block class of {model_class.__name__} to build per-layer shapes.")
    layer_class = layer_classes[0]
    original_init = layer_class.__init__

    def __init__(self, config, layer_idx, *args, **kwargs):
        original_init(self, config, layer_idx, *args, **kwargs)
        if sizes is not None:
            resize_mlp(self.mlp, sizes[layer_idx])
        if heads is not None:
            kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            resize_attention_heads(self.self_attn, heads[layer_idx], self.self_attn.head_dim, kv_heads)

    layer_class.__init__ = __init__
    try:
        yield
    finally:
        layer_class.__init__ = original_init


def resolve_dtype(name_or_path: str | os.PathLike, dtype=None):
    """The torch dtype to load `name_or_path` in: float32 for None, a torch dtype or its name as given, and
    for `"auto"` the dtype its `config.json` records (as `from_pretrained(dtype="auto")` does; float32 if none)."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        from transformers import AutoConfig

        source = name_or_path
        if str(name_or_path) == DEFAULT_TEACHER_NAME:
            from .defaults import default_teacher_path

            source = default_teacher_path()
        saved = getattr(AutoConfig.from_pretrained(source), "dtype", None)
        return getattr(torch, saved) if isinstance(saved, str) else saved or torch.float32
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"Unknown dtype {dtype!r}: give a torch dtype, its name (e.g. 'bfloat16') or 'auto'.")


def load_model(name_or_path: str, *, dtype=None):
    """`(model, tokenizer)` from 'default' (the embedded teacher), a local folder or a Hub id; the model in eval mode.

    Loaded with `load_pruned`, so per-block MLP sizes are rebuilt and the `PrunedConfig` found with the weights is
    attached. `dtype`: float32 when None, else a torch dtype, its name, or "auto" (see `resolve_dtype`).
    """
    from transformers import AutoTokenizer

    if name_or_path == DEFAULT_TEACHER_NAME:
        from .defaults import load_default_teacher

        return load_default_teacher(dtype=resolve_dtype(name_or_path, dtype))
    path = Path(name_or_path)
    if name_or_path.startswith((".", "/", "~")) and not path.exists():
        raise FileNotFoundError(f"No such model folder: {name_or_path}.")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: it is not a saved model folder.")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = load_pruned(name_or_path, dtype=resolve_dtype(name_or_path, dtype))
    return model.eval(), tokenizer


# -- does pruned_config.json describe the weights next to it? ---------------------------------------------------


def check_pruned_config_matches_weights(folder: str | os.PathLike, files: list[str] | None = None) -> None:
    """`pruned_config.json`, when present, must describe the model in the folder: same blocks, same MLP sizes.

    `files` are the names of the folder's files to consider (all of its top-level files by default). Reads only
    `config.json` and the safetensors headers. Raises `ValueError` naming what disagrees.
    """
    folder = Path(folder)
    if files is None:
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
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
