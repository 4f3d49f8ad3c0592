"""The documentation cannot drift from the code: the reference pages are generated from it and checked here."""

import dataclasses
import subprocess
import sys
from pathlib import Path

from transformers import TrainingArguments

from hf_recover.distill.config import DistillationConfig

ROOT = Path(__file__).resolve().parents[1]


def test_generated_pages_match_the_code():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr


def test_every_distillation_field_is_in_the_configuration_reference():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    for field in dataclasses.fields(DistillationConfig):
        if field.name not in base and field.init:
            assert f"| `{field.name}` |" in page, f"{field.name} is not documented"
