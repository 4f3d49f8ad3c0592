"""The examples run end to end on tiny models: examples/drop_in.py (and the plain Trainer script it is derived
from, which proves the "only these lines change" claim) and examples/width_recovery.py."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXTS, build_tiny_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_recover import DistillationTrainer, PrunedConfig, load_pruned, prune_depth

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MARKER = "  # hf_recover: "
# How each marked line of drop_in.py reads in the plain fine-tuning script ("+ teacher" lines do not exist there).
PLAIN_NAMES = [
    ("from hf_recover import", "from transformers import"),
    ("DistillationTrainer", "Trainer"),
    ("DistillationConfig", "TrainingArguments"),
]


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def _plain_version(source: str) -> str:
    """drop_in.py with its marked lines turned back into the ordinary Trainer script."""
    lines = []
    for line in source.splitlines():
        code, marked, note = line.partition(MARKER)
        if not marked:
            lines.append(line)
        elif note != "+ teacher":
            for new, old in PLAIN_NAMES:
                code = code.replace(new, old)
            lines.append(code)
    return "\n".join(lines) + "\n"


def _code_names(source: str) -> set[str]:
    """Identifiers used by the code (names, attributes, imports, keyword arguments, fields): not docstrings."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
    return names


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids).logits


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    import json

    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in TINY_TEXTS * 4))
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from conftest import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("teacher")
    build_tiny_model("llama", seed=0).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, teacher_dir) -> Path:
    """A depth-pruned student (blocks 1 and 4 removed), saved as `hf-recover prune` saves one."""
    path = tmp_path_factory.mktemp("student")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student, pruned_config = prune_depth(teacher, remove=[1, 4])
    student.save_pretrained(path)
    pruned_config.save_pretrained(path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(path)
    return path


def _trainer_flags(output_dir: Path) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--max_length", "16", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
        "--use_cpu", "--report_to", "none",
    ]  # fmt: skip


def _assert_model_folder(path: Path) -> None:
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()


# -- examples/drop_in.py ----------------------------------------------------------------------------------------


def test_drop_in_recovers_and_saves_a_reloadable_student(tmp_path, student_dir, teacher_dir, text_file):
    drop_in = _load_module(EXAMPLES / "drop_in.py", "drop_in_example")
    out = tmp_path / "recovered"
    argv = ["--model_name_or_path", str(student_dir), "--teacher_name_or_path", str(teacher_dir)]
    trainer = drop_in.main([*argv, "--dataset", str(text_file), *_trainer_flags(out)])

    assert type(trainer) is DistillationTrainer
    assert trainer.state.global_step == 2
    assert any("kd" in log for log in trainer.state.log_history), "the teacher's KD term was trained on"
    _assert_model_folder(out)
    assert PrunedConfig.from_pretrained(out).kept_layer_indices == [0, 2, 3, 5]
    card = (out / "README.md").read_text()
    assert "- hf-recover" in card and "depth pruning" in card

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    input_ids = torch.tensor([list(range(3, 40))])
    assert reloaded.config.num_hidden_layers == 4
    torch.testing.assert_close(_logits(reloaded, input_ids), _logits(trainer.model, input_ids), rtol=0, atol=1e-6)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert not torch.allclose(_logits(student, input_ids), _logits(reloaded, input_ids)), "training changed it"


def test_drop_in_differs_from_a_plain_trainer_script_only_in_marked_lines(tmp_path, student_dir, text_file):
    source = (EXAMPLES / "drop_in.py").read_text()
    plain = _plain_version(source)

    # Every hf_recover-specific identifier of the code sits on a marked line.
    recovery_names = _code_names(source)
    assert {"DistillationTrainer", "DistillationConfig", "teacher_model", "teacher_name_or_path"} <= recovery_names
    plain_names = _code_names(plain)
    assert {"Trainer", "TrainingArguments"} <= plain_names
    assert not plain_names & {"DistillationTrainer", "DistillationConfig", "teacher", "teacher_model", "TEACHER_HELP"}
    assert sum(MARKER in line for line in source.splitlines()) <= 10, "a drop-in change is a handful of lines"

    # The diff shown in the module docstring is the real one.
    recovery_lines = [line.partition(MARKER)[0] for line in source.splitlines()]
    diff = list(difflib.unified_diff(plain.splitlines(), recovery_lines, lineterm="", n=0))
    changed = [line for line in diff[2:] if line[:1] in "+-" and line[1:].strip()]
    docstring = ast.get_docstring(ast.parse(source))
    shown = [line[4:] for line in docstring.splitlines() if line.startswith(("    -", "    +"))]
    assert [line for line in changed if line[0] == "-"] == [line for line in shown if line[0] == "-"]
    assert [line for line in changed if line[0] == "+"] == [line for line in shown if line[0] == "+"]

    # And the plain script is an ordinary, working Trainer script.
    plain_path = tmp_path / "plain_train.py"
    plain_path.write_text(plain)
    out = tmp_path / "plain"
    trainer = _load_module(plain_path, "plain_train").main(
        ["--model_name_or_path", str(student_dir), "--dataset", str(text_file), *_trainer_flags(out)]
    )
    assert type(trainer) is Trainer and type(trainer.args) is TrainingArguments
    assert trainer.state.global_step == 2
    assert not any("kd" in log for log in trainer.state.log_history)
    _assert_model_folder(out)


# -- examples/width_recovery.py ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def width_recovery():
    return _load_module(EXAMPLES / "width_recovery.py", "width_recovery_example")


def _width_argv(output_dir: Path, teacher_dir: Path, text_file: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--teacher_name_or_path", str(teacher_dir), "--dataset", str(text_file),
        "--max_length", "16", "--max_steps", "2", "--batch_size", "2", "--eval_blocks", "2", *extra,
    ]  # fmt: skip


def test_width_recovery_with_kept_map_and_no_projectors(tmp_path, width_recovery, teacher_dir, text_file):
    out = tmp_path / "width"
    summary = width_recovery.main(_width_argv(out, teacher_dir, text_file, "--pruning_ratio", "0.25"))

    assert summary["student_mlp_sizes"] == [48] * 6
    assert summary["layer_map"] == list(range(6)), "width pruning keeps every block: the kept map is 1:1"
    assert summary["projectors"] == 0, "same hidden size: projector='auto' builds none"
    assert summary["parameters"]["student"] == summary["parameters"]["teacher"] - 6 * 3 * 16 * 32
    assert all(value > 0 for value in summary["perplexity"].values())
    _assert_model_folder(out)
    assert "| held-out |" in (out / "README.md").read_text(), "the card reports the before/after perplexity"
    assert not (out / "projectors.safetensors").exists()
    pruned_config = PrunedConfig.from_pretrained(out)
    assert pruned_config.pruning_types == ["width"] and pruned_config.student_intermediate_sizes == [48] * 6

    trainer = summary["trainer"]
    assert any("align" in log for log in trainer.state.log_history), "the alignment term was trained on"
    input_ids = torch.tensor([list(range(3, 40))])
    for reloaded in (load_pruned(out), AutoModelForCausalLM.from_pretrained(out)):  # uniform sizes: both loaders
        torch.testing.assert_close(_logits(reloaded, input_ids), _logits(trainer.model, input_ids), rtol=0, atol=1e-6)
    assert summary["reload_max_abs_logit_diff"] <= 1e-6


def test_width_recovery_uneven_blocks_uniform_map_linear_projectors(tmp_path, width_recovery, teacher_dir, text_file):
    out = tmp_path / "width"
    out.mkdir()
    (out / "old.txt").write_text("an earlier run")
    extra = ["--layers", "0", "2", "4", "--layer_map", "uniform", "--projector", "linear", "--save_projectors"]
    summary = width_recovery.main(_width_argv(out, teacher_dir, text_file, *extra, "--overwrite"))

    assert summary["student_mlp_sizes"] == [48, 64, 48, 64, 48, 64]
    assert summary["layer_map"] == list(range(6))
    assert summary["projectors"] == 6
    assert (out / "projectors.safetensors").is_file()
    input_ids = torch.tensor([list(range(3, 40))])
    reloaded = load_pruned(out)  # different MLP sizes per block: only load_pruned rebuilds them
    assert [layer.mlp.down_proj.in_features for layer in reloaded.model.layers] == [48, 64, 48, 64, 48, 64]
    trained = summary["trainer"].model
    torch.testing.assert_close(_logits(reloaded, input_ids), _logits(trained, input_ids), rtol=0, atol=1e-6)

    # An already-pruned student folder is recovered further without pruning again.
    again = width_recovery.main(
        _width_argv(tmp_path / "again", teacher_dir, text_file, "--student_name_or_path", str(out))
    )
    assert again["student_mlp_sizes"] == [48, 64, 48, 64, 48, 64]
    assert again["perplexity"]["pruned"] == pytest.approx(summary["perplexity"]["recovered"], rel=1e-4)


def test_width_recovery_refuses_to_overwrite_and_checks_paths(tmp_path, width_recovery, teacher_dir, text_file):
    out = tmp_path / "width"
    out.mkdir()
    (out / "model.safetensors").write_text("precious")
    with pytest.raises(ValueError, match="--overwrite"):
        width_recovery.main(_width_argv(out, teacher_dir, text_file))
    assert (out / "model.safetensors").read_text() == "precious"
    with pytest.raises(FileNotFoundError, match="No such model folder"):
        width_recovery.main(_width_argv(tmp_path / "new", tmp_path / "no_teacher", text_file))
    with pytest.raises(ValueError, match="layer_map"):
        width_recovery.main(_width_argv(tmp_path / "new", teacher_dir, text_file, "--layer_map", "diagonal"))
    assert not (tmp_path / "new").exists()


def test_strategy_lab_example_is_the_compare_command(tmp_path, tiny_tokenizer, monkeypatch):
    """examples/strategy_lab.py forwards its flags to `hf-recover compare` unchanged."""
    lab = _load_module(EXAMPLES / "strategy_lab.py", "strategy_lab_example")
    seen = {}
    from hf_recover.cli import command_module

    monkeypatch.setattr(command_module("compare"), "main", lambda *dataclasses: seen.setdefault("args", dataclasses))
    lab.run(["--prune", "last", "--strategies", "compound", "--max_steps", "3", "--output_dir", str(tmp_path)])
    compare_args, data_args, config = seen["args"]
    assert compare_args.prune == ["last"] and compare_args.strategies == ["compound"]
    assert config.max_steps == 3 and config.output_dir == str(tmp_path)
    assert data_args.max_length == 256  # the lab's own defaults apply


# -- examples/run_clm_distill.py: transformers' run_clm, changed in five lines -------------------------------------


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("clm_text")
    train, validation = folder / "train.txt", folder / "validation.txt"
    train.write_text("\n".join(TINY_TEXTS * 4) + "\n")
    validation.write_text("\n".join(reversed(TINY_TEXTS)) + "\n")
    return train, validation


def _clm_argv(model: Path, output_dir: Path, text_files: tuple[Path, Path], *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--train_file", str(text_files[0]),
        "--validation_file", str(text_files[1]), "--block_size", "16", "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "3", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "--report_to", "none", "--seed", "0", *extra,
    ]  # fmt: skip


def _printed_perplexity(output: str) -> float:
    (line,) = [line for line in output.splitlines() if line.strip().startswith("perplexity ")]
    return float(line.split("=")[1])


def test_run_clm_distill_prints_the_students_perplexity(tmp_path, student_dir, teacher_dir, text_files, capsys):
    from hf_recover import evaluate_perplexity

    run_clm = _load_module(EXAMPLES / "run_clm_distill.py", "run_clm_distill_example")
    out = tmp_path / "recovered"
    argv = _clm_argv(student_dir, out, text_files, "--teacher_name_or_path", str(teacher_dir))
    trainer, metrics = run_clm.main([*argv, "--do_train", "--do_eval", "--max_steps", "2", "--beta", "0.8"])
    printed = _printed_perplexity(capsys.readouterr().out)

    assert type(trainer) is DistillationTrainer and trainer.state.global_step == 2
    assert any("kd" in log for log in trainer.state.log_history), "the teacher's KD term was trained on"
    # the printed perplexity is the trained student's, measured independently on the same blocks
    student = AutoModelForCausalLM.from_pretrained(out)
    reference = evaluate_perplexity(student, trainer.eval_dataset, batch_size=2)["perplexity"]
    assert printed == pytest.approx(reference, rel=1e-4)
    # the objective is reported beside it and is another number
    assert metrics["eval_distillation_loss"] == pytest.approx(
        trainer.args.alpha * metrics["eval_ce"] + 0.8 * trainer.args.temperature**2 * metrics["eval_kd"], rel=1e-5
    )
    assert abs(metrics["eval_distillation_loss"] - metrics["eval_loss"]) > 1e-3

    # The plain run_clm (the marked lines turned back) evaluates the recovered student to the same perplexity.
    source = (EXAMPLES / "run_clm_distill.py").read_text()
    assert sum(MARKER in line for line in source.splitlines()) == 5
    plain_path = tmp_path / "run_clm_plain.py"
    plain_path.write_text(_plain_version(source))
    plain_trainer, _ = _load_module(plain_path, "run_clm_plain").main(
        [*_clm_argv(out, tmp_path / "plain", text_files), "--do_eval"]
    )
    assert type(plain_trainer) is Trainer and type(plain_trainer.args) is TrainingArguments
    assert _printed_perplexity(capsys.readouterr().out) == pytest.approx(printed, rel=1e-4)


def test_run_clm_distill_diff_in_its_docstring_is_the_real_one():
    source = (EXAMPLES / "run_clm_distill.py").read_text()
    recovery_lines = [line.partition(MARKER)[0] for line in source.splitlines()]
    diff = list(difflib.unified_diff(_plain_version(source).splitlines(), recovery_lines, lineterm="", n=0))
    changed = [line for line in diff[2:] if line[:1] in "+-" and line[1:].strip()]
    docstring = ast.get_docstring(ast.parse(source))
    shown = [line[4:] for line in docstring.splitlines() if line.startswith(("    -", "    +"))]
    assert [line for line in changed if line[0] == "-"] == [line for line in shown if line[0] == "-"]
    assert [line for line in changed if line[0] == "+"] == [line for line in shown if line[0] == "+"]
