"""What every benchmark shares: each variant runs in a fresh Python process (so that its peak memory is its own),
reports one JSON line, and the parent collects it."""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def run_variant(script: str, flags: dict[str, object]) -> dict:
    """Run `python script --flag value ...` (flags whose value is None are left out, True ones have no value) and
    return the JSON object its last output line holds; a failure raises with the end of its stderr."""
    command = [sys.executable, script]
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        command += [flag] if value is True else [flag, str(value)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """The peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def save_teacher_and_student(folder, teacher, removed: list[int]) -> None:
    """`folder/teacher` and `folder/student` (the teacher without blocks `removed`, with its `pruned_config.json`),
    for the variants to load."""
    from hf_recover import prune_depth

    student, pruned = prune_depth(teacher, remove=removed)
    teacher.save_pretrained(folder / "teacher")
    student.save_pretrained(folder / "student")
    pruned.save_pretrained(folder / "student")
