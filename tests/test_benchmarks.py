"""Every benchmark still starts: its imports, arguments and `--help`, each loaded in this process (the measurements
themselves are run by hand, on a quiet machine; see benchmarks/README.md)."""

import importlib.util
from pathlib import Path

import pytest

FOLDER = Path(__file__).parents[1] / "benchmarks"
SHARED = {"harness.py", "protocol.py"}  # code the benchmarks share, not benchmarks
BENCHMARKS = sorted(p for p in FOLDER.glob("*.py") if p.name not in SHARED)


def load_benchmark(script: Path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_benchmark_starts(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(FOLDER))  # as when it runs as a script: its shared modules import
    benchmark = load_benchmark(script)
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_a_benchmark_that_does_not_start_fails(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("from hf_recover.no_such_module import main\n")
    with pytest.raises(ModuleNotFoundError):
        load_benchmark(broken)
    refuses = tmp_path / "refuses.py"
    refuses.write_text("import argparse\n\ndef main(argv=None):\n    argparse.ArgumentParser().parse_args(argv)\n")
    with pytest.raises(SystemExit) as exit_:
        load_benchmark(refuses).main(["--no-such-flag"])
    assert exit_.value.code == 2


def test_recovery_quality_chooses_on_dev_and_passes_the_teacher_data_flags_on(monkeypatch):
    from hf_recover.distill.answer_filter import GOOD_ANSWERS

    monkeypatch.syspath_prepend(str(FOLDER))
    benchmark = load_benchmark(FOLDER / "recovery_quality.py")
    assert benchmark.mixture_settings(benchmark.parse_args([])) == {}  # the demo's mixture
    args = benchmark.parse_args(["--prompts", "dev", "--num_prompts", "64", "--max_answer_tokens", "100"])
    assert args.prompts == "dev"
    settings = benchmark.mixture_settings(args)
    assert settings["num_prompts"] == 64
    assert settings["answer_filter"].max_answer_tokens == 100
    assert settings["answer_filter"].max_repeated_ngram_rate == GOOD_ANSWERS.max_repeated_ngram_rate
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--prompts", "train"])
