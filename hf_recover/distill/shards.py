"""A dataset written shard by shard into a folder: resumable, shared among processes, checked when it is loaded.

The teacher cache (`hf_recover.distill.teacher_cache`) and the teacher data (`hf_recover.distill.teacher_data`) are
such builds. A build starts by writing its plan (`build.json`: everything that decides its content); a shard folder
appears under `shards/` only once complete (written aside, then renamed), so a rerun of the same plan resumes where
an interrupted one stopped, and a rerun of another plan is refused. Under `torchrun` / `accelerate launch`, process
`r` of `n` builds shards `r, r + n, ...`. When every shard is there, the main process writes the metadata file
(the plan, each shard's rows, file sizes and sha256) and removes `build.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .fingerprints import file_checksums

BUILD_NAME = "build.json"
"""Written when a build starts and removed when it ends: a folder holding it is an interrupted build to resume."""
SHARDS_DIR = "shards"
EMPTY_NAME = "empty.json"
"""Stands in a shard folder for a shard that holds no row."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


class ShardedBuild:
    """One build of a sharded dataset into `output_dir` (see the module docstring).

    Args:
        output_dir: the folder to build into.
        plan: JSON-ready values that decide the content, `num_rows` and `shard_size` among them.
        metadata_name: the file a finished build is recognised by (e.g. `teacher_cache.json`).
        what: how error messages name the dataset (e.g. "teacher cache").
        overwrite: replace a finished build, or an interrupted build of another plan, in `output_dir`.
    """

    def __init__(
        self, output_dir: str | os.PathLike, plan: dict[str, Any], *, metadata_name: str, what: str, overwrite=False
    ):
        from accelerate import PartialState

        self.output_dir, self.plan, self.metadata_name, self.what = Path(output_dir), plan, metadata_name, what
        self.num_shards = -(-plan["num_rows"] // plan["shard_size"])
        self.plan["num_shards"] = self.num_shards
        # Without a GPU, accelerate would see a torchrun launch as one process unless told that it runs on CPUs.
        self.state = PartialState(cpu=not torch.cuda.is_available())
        if self.state.is_main_process:
            self._prepare(overwrite)
        self.state.wait_for_everyone()

    def _prepare(self, overwrite: bool) -> None:
        """Refuse to replace a finished build without `overwrite`; keep an interrupted build of the same plan."""
        folder, build_file = self.output_dir, self.output_dir / BUILD_NAME
        if overwrite and folder.exists():
            shutil.rmtree(folder)
        if (folder / self.metadata_name).exists():
            raise FileExistsError(
                f"{folder} already holds a {self.what}; pass overwrite=True (--overwrite) to replace it, or choose "
                "another output_dir."
            )
        if build_file.exists():
            previous = json.loads(build_file.read_text())
            differing = sorted(k for k in self.plan if previous.get(k) != self.plan[k])
            if differing:
                raise ValueError(
                    f"{folder} holds an interrupted build of another {self.what} (it differs in {differing}); pass "
                    "overwrite=True (--overwrite) to start over, or choose another output_dir."
                )
        elif folder.exists() and any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} is not empty and holds no {self.what}; choose an empty or new output_dir, or pass "
                "overwrite=True (--overwrite) to replace its contents."
            )
        (folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        build_file.write_text(json.dumps(self.plan, indent=2, sort_keys=True) + "\n")

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def num_processes(self) -> int:
        return self.state.num_processes

    def pending(self) -> list[int]:
        """The shards this process builds that are not written yet."""
        shards = range(self.state.process_index, self.num_shards, self.state.num_processes)
        return [i for i in shards if not (self.output_dir / SHARDS_DIR / shard_name(i)).is_dir()]

    def rows(self, index: int) -> range:
        """The rows (of the `num_rows` the plan has) that shard `index` is built from."""
        size = self.plan["shard_size"]
        return range(index * size, min((index + 1) * size, self.plan["num_rows"]))

    def save(self, index: int, shard) -> None:
        """Write shard `index` (a `Dataset`); it appears under its final name only once complete."""
        final = self.output_dir / SHARDS_DIR / shard_name(index)
        partial = final.with_name(final.name + f".partial-{self.state.process_index}")
        shutil.rmtree(partial, ignore_errors=True)
        if len(shard) == 0:  # `datasets` cannot read back an empty saved dataset: a marker stands for it
            partial.mkdir(parents=True)
            (partial / EMPTY_NAME).write_text("{}\n")
        else:
            with quiet_datasets():  # the build's own progress bar, not one more per shard
                shard.save_to_disk(str(partial))
        os.replace(partial, final)

    def finish(self, complete: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        """Once every process is done: on the main process, write `complete(shards)` (given each shard's name, rows
        and file checksums) as the metadata file, then remove the build marker."""
        from datasets import load_from_disk

        self.state.wait_for_everyone()
        if self.state.is_main_process:
            shards = []
            for index in range(self.num_shards):
                folder = self.output_dir / SHARDS_DIR / shard_name(index)
                # a shard may hold fewer rows than planned (filtered), or none
                rows = 0 if (folder / EMPTY_NAME).is_file() else load_from_disk(str(folder)).num_rows
                shards.append({"name": folder.name, "num_rows": rows, "files": file_checksums(folder)})
            metadata = complete(shards)
            (self.output_dir / self.metadata_name).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
            (self.output_dir / BUILD_NAME).unlink()
        self.state.wait_for_everyone()


@contextmanager
def quiet_datasets():
    """`datasets`' progress bars off inside the block."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def stored_bytes(shards: list[dict[str, Any]]) -> int:
    """The bytes a build's shards take on disk."""
    return sum(f["bytes"] for shard in shards for f in shard["files"].values())


# -- reading a finished build -------------------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike, *, metadata_name: str, format_version: int, what: str, build_hint: str):
    """A finished build's metadata, without reading its shards; a `FileNotFoundError` when there is none at `path`
    (saying so when an interrupted build is there), a `ValueError` for another format version."""
    path = Path(path)
    metadata_file = path / metadata_name
    if not metadata_file.is_file():
        if (path / BUILD_NAME).is_file():
            raise FileNotFoundError(
                f"{path} holds an interrupted {what} build (no {metadata_name} yet): run the same {build_hint} again "
                "to finish it."
            )
        raise FileNotFoundError(f"No {what} at {path} (no {metadata_name}): build one with {build_hint}.")
    try:
        metadata = json.loads(metadata_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{metadata_file} is not valid JSON ({err}): the {what} in {path} is damaged (a write cut short?). "
            f"Build it again with {build_hint}, passing overwrite=True (--overwrite)."
        ) from err
    if metadata.get("format_version") != format_version:
        raise ValueError(
            f"{path} is a {what} of format {metadata.get('format_version')}; this hf_recover reads format "
            f"{format_version}. Rebuild it."
        )
    return metadata


def load_shards(
    path: str | os.PathLike,
    metadata: dict[str, Any],
    *,
    what: str,
    verify_checksums: bool = True,
    keep_in_memory: bool = False,
):
    """Every shard of a finished build, concatenated; missing shards are a `FileNotFoundError`, truncated or
    corrupted ones (file sizes, and sha256 with `verify_checksums`) a `ValueError`. `keep_in_memory` reads them
    into memory, so that no later `filter` or `map` writes its cache files into the folder."""
    from datasets import concatenate_datasets, load_from_disk

    path, shards = Path(path), []
    for shard in metadata["shards"]:
        folder = path / SHARDS_DIR / shard["name"]
        if not folder.is_dir():
            raise FileNotFoundError(f"Shard {shard['name']} of the {what} {path} is missing ({folder}).")
        _check_shard_files(folder, shard["files"], verify_checksums, what)
        if shard["num_rows"] == 0:
            continue
        try:
            loaded = load_from_disk(str(folder), keep_in_memory=keep_in_memory)
        except Exception as err:  # Arrow raises several types for a damaged file
            raise ValueError(f"Shard {shard['name']} of the {what} {path} cannot be read ({err}).") from err
        if len(loaded) != shard["num_rows"]:
            raise ValueError(
                f"Shard {shard['name']} of the {what} {path} has {len(loaded)} rows, its metadata "
                f"{shard['num_rows']}: it is truncated. Rebuild it with overwrite."
            )
        shards.append(loaded)
    if not shards:
        raise ValueError(f"The {what} at {path} holds no row: every shard came out empty.")
    return concatenate_datasets(shards) if len(shards) > 1 else shards[0]


def _check_shard_files(folder: Path, expected: dict[str, dict], verify_checksums: bool, what: str) -> None:
    for name, facts in expected.items():
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from the {what}; rebuild it with overwrite.")
        size = file.stat().st_size
        if size != facts["bytes"]:
            raise ValueError(
                f"{file} has {size} bytes, the {what}'s metadata {facts['bytes']}: it is truncated or corrupted. "
                "Rebuild it with overwrite."
            )
    if verify_checksums:
        actual = file_checksums(folder)
        for name, facts in expected.items():
            if actual[name]["sha256"] != facts["sha256"]:
                raise ValueError(
                    f"{folder / name} does not match its sha256 in the {what}'s metadata: it is corrupted. "
                    "Rebuild it with overwrite."
                )
