"""The cache of the embedded defaults: where it lives, how a folder in it is built once, and how it is checked.

Every cached folder (the converted teacher, the built corpus) holds `hf_recover_source.json`: where its
content came from and, under `"files"`, the size, SHA-256 and modification time of every file written
when the folder was built. Each load checks the folder against that record, under the same file lock
that guards the build, and rebuilds a damaged folder (a file missing, cut short by a full disk or a
killed copy, or rewritten) instead of failing later with a raw safetensors or Arrow error.

How much to hash. Sizes are always compared (a `stat`, free). A file is hashed again only when its modification
time differs from the recorded one, as git's index does for the work tree: the damage this guards against
(truncation, an interrupted copy, a rewrite) changes the size or the modification time, while hashing the teacher's
538 MB `model.safetensors` on every load would add most of a second to every CLI command for a file that has not
changed (the check by sizes and times takes under a millisecond). A file whose time changed but whose hash still
matches (a cache copied without `cp -p`) is accepted and its new time recorded, so only the first load after a copy
pays.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RECORD_NAME = "hf_recover_source.json"
"""The file, inside each cached folder, that records its source and its files."""


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


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_record(folder: Path, source: dict[str, Any]) -> dict[str, Any]:
    """Write `hf_recover_source.json` into a freshly built `folder`: `source` plus every file's size and hash."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != RECORD_NAME):
        stat = path.stat()
        files[path.relative_to(folder).as_posix()] = {
            "size": stat.st_size,
            "sha256": sha256_of(path),
            "mtime_ns": stat.st_mtime_ns,
        }
    record = {**source, "files": files}
    (folder / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def find_damage(folder: Path) -> list[str]:
    """What is wrong with a built `folder` against its record (empty when nothing is); see the module docstring."""
    record_path = folder / RECORD_NAME
    try:
        record = json.loads(record_path.read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{RECORD_NAME} is unreadable ({type(err).__name__}: {err})"]
    problems, rehashed = [], False
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        stat = path.stat()
        if stat.st_size != expected["size"]:
            problems.append(f"{name} has {stat.st_size:,} bytes, {expected['size']:,} were written")
        elif stat.st_mtime_ns != expected["mtime_ns"]:
            if sha256_of(path) != expected["sha256"]:
                problems.append(f"{name} was changed after it was written (its SHA-256 differs)")
            else:
                expected["mtime_ns"], rehashed = stat.st_mtime_ns, True
    if rehashed and not problems:
        # intact, only touched or copied: remember the new times so that the next load hashes nothing
        with contextlib.suppress(OSError):  # a read-only cache is fine, it is just hashed again next time
            record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return problems


def ensure_built(folder: Path, build: Callable[[Path], None], *, what: str, legacy_marker: str | None = None) -> Path:
    """`folder`, built by `build(folder)` if it does not exist yet, and rebuilt if it is damaged.

    `build` must leave a complete folder with its record (`write_record`) or nothing at all. A folder that an
    hf_recover without records built (it holds `legacy_marker` but no file list) is checked as far as its
    format allows, then its files are recorded as they are.
    """
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # two processes never build, check or rebuild at once
        if _is_legacy(folder, legacy_marker):
            _adopt(folder, what)
        if (folder / RECORD_NAME).is_file():
            problems = find_damage(folder)
            if not problems:
                return folder
            logger.warning("The cached %s in %s is damaged (%s); rebuilding it.", what, folder, "; ".join(problems))
            try:
                shutil.rmtree(folder)
            except OSError as err:
                raise RuntimeError(
                    f"The cached {what} in {folder} is damaged ({'; '.join(problems)}) and could not be removed "
                    f"({err}). Delete the folder {folder} by hand; the next call rebuilds it."
                ) from err
        build(folder)
    return folder


def _is_legacy(folder: Path, legacy_marker: str | None) -> bool:
    if legacy_marker is None or not (folder / legacy_marker).is_file():
        return False
    record_path = folder / RECORD_NAME
    if not record_path.is_file():
        return True
    try:
        return "files" not in json.loads(record_path.read_text())
    except ValueError:
        return False  # an unreadable record: find_damage reports it and the folder is rebuilt


def _adopt(folder: Path, what: str) -> None:
    """Record the files of a folder built before records existed, if its weights files are whole."""
    from safetensors import SafetensorError, safe_open

    for path in folder.rglob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt"):  # reads the header and checks the size it announces
                pass
        except SafetensorError as err:
            logger.warning("The cached %s in %s is damaged (%s: %s); rebuilding it.", what, folder, path.name, err)
            shutil.rmtree(folder)
            return
    record_path = folder / RECORD_NAME
    source = json.loads(record_path.read_text()) if record_path.is_file() else {}
    logger.info("Recording the sizes and hashes of the cached %s in %s (built by an older hf_recover).", what, folder)
    write_record(folder, source)
