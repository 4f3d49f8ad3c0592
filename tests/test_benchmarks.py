"""Every benchmark still starts: its imports, arguments and `--help` (the measurements themselves are run by hand,
on a quiet machine; see benchmarks/README.md)."""

import subprocess
import sys
from pathlib import Path

import pytest

SHARED = {"harness.py", "protocol.py"}  # code the benchmarks share, not benchmarks
BENCHMARKS = sorted(p for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py") if p.name not in SHARED)


@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_benchmark_starts(script):
    completed = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "usage:" in completed.stdout
