"""`hf-recover` end to end on tiny models: prune -> recover -> evaluate -> push, and the other commands."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXTS, build_tiny_model
from huggingface_hub import HfApi

from hf_recover import PrunedConfig
from hf_recover.base.loading import load_pruned
from hf_recover.cli import command_module
from hf_recover.cli import main as cli
from hf_recover.prune.spec import PruneSpec

FAST = ["--max_length", "32", "--eval_max_length", "32", "--eval_blocks", "3", "--calibration_blocks", "3"]
TRAIN = ["--max_steps", "3", "--logging_steps", "1", "--use_cpu", "--per_device_train_batch_size", "2"]


@pytest.fixture
def workspace(tmp_path, tiny_tokenizer):
    teacher = build_tiny_model("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "data").mkdir()
    for i in range(30):
        text = " ".join(TINY_TEXTS[(i + j) % len(TINY_TEXTS)] for j in range(3))
        (tmp_path / "data" / f"doc{i}.txt").write_text(text)
    (tmp_path / "ood").mkdir()
    for i in range(4):
        (tmp_path / "ood" / f"doc{i}.txt").write_text(" ".join(reversed(TINY_TEXTS)))
    return tmp_path


def data_flags(ws, command: str) -> list[str]:
    """The test text's flags that `command` reads (a command refuses a flag it never reads)."""
    from hf_recover.cli import command_module

    known = {option for action in command_module(command).make_parser()._actions for option in action.option_strings}
    flags = ["--dataset", str(ws / "data"), "--ood_dataset", str(ws / "ood"), *FAST]
    return [part for flag, value in zip(flags[::2], flags[1::2]) if flag in known for part in (flag, value)]


def test_prune_recover_evaluate_push(workspace, monkeypatch, capsys):
    ws = workspace
    cli(["prune", "--model", str(ws / "teacher"), "--prune", "importance:2", "--output_dir", str(ws / "student"),
         *data_flags(ws, "prune")])  # fmt: skip
    pruned = PrunedConfig.from_pretrained(ws / "student")
    assert pruned.num_student_layers == 4 and len(pruned.removed_layer_indices) == 2

    cli(["recover", "--teacher", str(ws / "teacher"), "--student", str(ws / "student"),
         "--output_dir", str(ws / "recovered"), "--gamma", "0.1", *data_flags(ws, "recover"), *TRAIN])  # fmt: skip
    out = ws / "recovered"
    for name in ("model.safetensors", "tokenizer.json", "pruned_config.json", "README.md", "loss_curve.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["train_steps"] == 3
    assert set(results["perplexity"]) == {"validation", "ood"}
    assert set(results["perplexity"]["validation"]) == {"teacher", "pruned", "recovered"}
    printed = capsys.readouterr().out
    assert "| validation |" in printed and "| ood |" in printed and "recovery" in printed
    # The saved layer map is the one depth pruning kept.
    assert PrunedConfig.from_pretrained(out).kept_layer_indices == pruned.kept_layer_indices

    cli(["evaluate", "--model", str(out), "--teacher", str(ws / "teacher"), "--pruned", str(ws / "student"),
         "--output_file", str(ws / "eval.json"), *data_flags(ws, "evaluate")])  # fmt: skip
    figures = json.loads((ws / "eval.json").read_text())
    # Same model, same data: evaluate reproduces the recovered perplexity that recover measured.
    assert figures["perplexity"]["validation"]["recovered"] == pytest.approx(
        results["perplexity"]["validation"]["recovered"], rel=1e-4
    )
    assert "recovery" in figures["recovery_validation"]

    sent = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: sent.setdefault("repo", repo_id))
    monkeypatch.setattr(
        HfApi,
        "create_commit",
        lambda self, repo_id, operations, **kw: sent.update(files={op.path_in_repo for op in operations}, **kw),
    )
    cli(["push", "--folder", str(out), "--repo_id", "someone/tiny-recovered", "--commit_message", "recovered"])
    assert sent["repo"] == "someone/tiny-recovered" and sent["commit_message"] == "recovered"
    assert {"model.safetensors", "config.json", "pruned_config.json", "README.md", "tokenizer.json"} <= sent["files"]
    assert "training_args.bin" not in sent["files"]


def test_recover_with_prune_spec_and_yaml_config(workspace):
    ws = workspace
    config = ws / "recover.yaml"
    config.write_text(
        f"teacher: {ws / 'teacher'}\nprune: last:3\noutput_dir: {ws / 'from_yaml'}\ndataset: [{ws / 'data'}]\n"
        "max_steps: 2\nbeta: 0.7\nalpha: 0.3\nmax_length: 32\neval_max_length: 32\neval_blocks: 2\nuse_cpu: true\n"
    )
    cli(["recover", "--config", str(config), "--alpha", "0.4"])  # the command line wins over the file
    results = json.loads((ws / "from_yaml" / "results.json").read_text())
    assert results["strategy"]["beta"] == 0.7 and results["strategy"]["alpha"] == 0.4
    assert results["prune"] == {"depth": {"method": "last", "n": 3}}
    assert PrunedConfig.from_pretrained(ws / "from_yaml").kept_layer_indices == [0, 1, 2]


def test_width_prune_then_reload(workspace):
    ws = workspace
    cli(["prune", "--model", str(ws / "teacher"), "--prune", "width:maw:0.25", "--output_dir", str(ws / "narrow"),
         "--max_length", "32", "--calibration_blocks", "3"])  # fmt: skip
    model = load_pruned(ws / "narrow")
    assert PrunedConfig.from_pretrained(ws / "narrow").student_intermediate_sizes == [48] * 6
    assert model.model.layers[0].mlp.gate_proj.out_features == 48


def test_importance_and_select(workspace, capsys):
    ws = workspace
    cli(["importance", "--model", str(ws / "teacher"), "--output_dir", str(ws / "imp"), *data_flags(ws, "importance")])
    scores = json.loads((ws / "imp" / "importance.json").read_text())
    assert len(scores["scores"]) == 6 and sorted(scores["ranking_low_to_high"]) == list(range(6))
    assert (ws / "imp" / "importance.png").stat().st_size > 1000

    cli(["select", "--model", str(ws / "teacher"), "--prune", "importance:2", "last:2", "--save_best",
         "--output_dir", str(ws / "sel"), *data_flags(ws, "select")])  # fmt: skip
    table = json.loads((ws / "sel" / "candidates.json").read_text())
    assert {c["name"] for c in table["candidates"]} == {"importance:2", "last:2"}
    ppl = [c["perplexity"] for c in table["candidates"]]
    assert ppl == sorted(ppl)  # ranked best first
    assert PrunedConfig.from_pretrained(ws / "sel" / "best").num_student_layers == 4


def test_compare_lab_runs_every_pair_at_equal_budget(workspace):
    ws = workspace
    cli(["compare", "--teacher", str(ws / "teacher"), "--prune", "importance", "last", "--strategies",
         "ce_only", "skew_fdd", "--n_remove", "2", "--output_dir", str(ws / "lab"), "--max_steps", "2",
         *data_flags(ws, "compare"), "--use_cpu"])  # fmt: skip
    rows = json.loads((ws / "lab" / "results.json").read_text())
    assert [(r["pruning"], r["strategy"]) for r in rows] == [
        ("importance", "ce_only"), ("importance", "skew_fdd"), ("last", "ce_only"), ("last", "skew_fdd")
    ]  # fmt: skip
    assert len({r["train_tokens"] for r in rows}) == 1  # equal token budgets
    # Every strategy starts from the same pruned student.
    assert rows[0]["validation"]["pruned"] == rows[1]["validation"]["pruned"]
    assert rows[2]["removed"] == [4, 5]
    assert "| importance | ce_only | none |" in (ws / "lab" / "results.md").read_text()
    assert (ws / "lab" / "recovery_curves_last.png").is_file() and (ws / "lab" / "block_importance.png").is_file()
    assert (ws / "lab" / "recovery_vs_tokens.png").is_file()


def test_compare_lab_measures_every_row_against_the_first_pruning(workspace):
    ws = workspace
    cli(["compare", "--teacher", str(ws / "teacher"), "--prune", "last", "remove:3,4:heal=lstsq", "--strategies",
         "recommended", "--n_remove", "2", "--output_dir", str(ws / "lab"), "--max_steps", "4", "--curve_points",
         "2", "--reach", "-1000", *data_flags(ws, "compare"), "--use_cpu"])  # fmt: skip
    rows = json.loads((ws / "lab" / "results.json").read_text())
    assert [(r["pruning"], r["removed"]) for r in rows] == [("last", [4, 5]), ("remove:3,4:heal=lstsq", [3, 4])]
    reference = rows[0]["validation"]
    for row in rows:
        figures = row["validation"]
        assert [tokens for tokens, _ in figures["curve"]] == [0, 2 * 2 * 32, 4 * 2 * 32]  # 0, 2, 4 steps of 2 x 32
        teacher, pruned, recovered = figures["teacher"], reference["pruned"], figures["recovered"]
        expected = 100 * (pruned - recovered) / (pruned - teacher)  # by hand, against the first row's pruned PPL
        assert figures["curve"][-1][1] == pytest.approx(expected)
        assert figures["recovery"] == pytest.approx(expected / 100)
        # before training: the row's own pruned perplexity, measured against the reference
        assert figures["curve"][0][1] == pytest.approx(100 * (pruned - figures["pruned"]) / (pruned - teacher))
        assert figures["tokens_to_reach"] == 0  # every point is above -1000 %
    assert rows[0]["validation"]["curve"][0][1] == 0.0
    assert "tokens to -1000%" in (ws / "lab" / "results.md").read_text()
    assert (ws / "lab" / "recovery_curves_remove_3_4_heal_lstsq.png").is_file()  # the spec, as a file name


def test_evaluate_measures_the_assistant_with_a_chat_teacher(workspace, tiny_chat_tokenizer):
    ws = workspace
    build_tiny_model("llama").save_pretrained(ws / "chat-teacher")
    tiny_chat_tokenizer.save_pretrained(ws / "chat-teacher")
    cli(["prune", "--model", str(ws / "chat-teacher"), "--prune", "last:2", "--output_dir", str(ws / "student"),
         *data_flags(ws, "prune")])  # fmt: skip
    # the teacher evaluated as the "recovered" model: it closes the whole gap, by definition
    cli(["evaluate", "--model", str(ws / "chat-teacher"), "--teacher", str(ws / "chat-teacher"), "--pruned",
         str(ws / "student"), "--chat_prompts", "dev", "--output_file", str(ws / "eval.json"),
         *data_flags(ws, "evaluate")])  # fmt: skip
    assistant = json.loads((ws / "eval.json").read_text())["assistant"]
    assert set(assistant) == {"teacher", "pruned", "recovered"}
    assert assistant["teacher"]["top1_agreement"] == assistant["recovered"]["top1_agreement"] == 1.0
    assert assistant["recovered"]["log_perplexity_recovery"] == pytest.approx(1.0)
    assert assistant["pruned"]["top1_agreement"] < 1.0  # another model: not the teacher's every token


def test_evaluate_computes_in_the_precision_asked(workspace, monkeypatch, capsys):
    """`--precision bfloat16` evaluates every model under bfloat16 autocast and says so in the table; float32, the
    default, leaves autocast off."""
    import hf_recover.base.evaluation as evaluation

    ws, seen, score = workspace, [], evaluation.score_models

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return score(*args, **kwargs)

    monkeypatch.setattr(evaluation, "score_models", spy)
    for precision, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        seen.clear()
        out = ws / f"eval-{precision}.json"
        cli(["evaluate", "--model", str(ws / "teacher"), "--precision", precision, "--output_file", str(out),
             *data_flags(ws, "evaluate")])  # fmt: skip
        assert seen and set(seen) == {dtype} and f"computed in {precision}" in capsys.readouterr().out
        perplexity = json.loads(out.read_text())["perplexity"]
        assert all(value > 0 for split in perplexity.values() for value in split.values())


def test_output_folder_is_never_overwritten_without_asking(workspace):
    ws = workspace
    (ws / "taken").mkdir()
    (ws / "taken" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="--overwrite"):
        cli(["prune", "--model", str(ws / "teacher"), "--prune", "last:1", "--output_dir", str(ws / "taken")])
    assert (ws / "taken" / "precious.txt").read_text() == "keep me"
    cli(["prune", "--model", str(ws / "teacher"), "--prune", "last:1", "--output_dir", str(ws / "taken"),
         "--overwrite"])  # fmt: skip
    assert (ws / "taken" / "pruned_config.json").is_file()


@pytest.mark.parametrize(
    "argv, error, match",
    [
        (["recover", "--student", "./missing-student", "--teacher", "default"], FileNotFoundError, "not a folder"),
        (["evaluate", "--model", "./no/such/model"], FileNotFoundError, "No such model folder"),
        (["prune", "--prune", "importance:six"], ValueError, "Unknown prune spec"),
        (["prune", "--prune", '{"depth": {"count": 3}}'], ValueError, "'depth' has unknown key\\(s\\) \\['count'\\]"),
        (["compare", "--strategies", "magic"], ValueError, "Unknown strategy"),
        (["compare", "--prune", "magic:3"], ValueError, "Unknown prune spec"),
        (["compare", "--curve_points", "0"], ValueError, "at least 1 point"),
        (["recover", "--prune", "last:2", "--student", "x"], ValueError, "exactly one of"),
        (["recover", "--prune", "last:2", "--on_policy_steps", "-1"], ValueError, "--on_policy_steps must be >= 0"),
        (
            ["recover", "--prune", "last:2", "--on_policy_steps", "4", "--teacher_data", "none"],
            ValueError,
            "--on_policy_steps answers the teacher data's prompts",
        ),
        (["recover", "--prune", "importance:2+last:1"], ValueError, "two depth parts, 'importance:2' and 'last:1'"),
        (
            ["recover", "--prune", "last:2", "--answers_per_prompt", "2", "--answer_temperature", "0"],
            ValueError,
            "--answers_per_prompt 1",
        ),
        (["recover", "--prune", "last:2", "--answer_top_p", "0"], ValueError, "top_p must be in"),
        (["recover", "--prune", "last:2", "--answers_per_prompt", "0"], ValueError, "got 0"),
        (["recover", "--prune", "last:2", "--max_answer_tokens", "0"], ValueError, "--max_answer_tokens: .* got 0"),
        (
            ["recover", "--prune", "last:2", "--max_answer_tokens", "256", "--no_filter_answers"],
            ValueError,
            "--no_filter_answers reads every answer",
        ),
        (
            ["recover", "--prune", "last:2", "--on_policy_steps", "3", "--sample_fraction", "0.2"],
            ValueError,
            "a sample has no prompt",
        ),
        (["recover", "--prune", "last:2", "--chat_prompts", "my.json"], ValueError, "got 'my.json'"),
        (["evaluate", "--model", "./m", "--chat_prompts", "my.json"], ValueError, "got 'my.json'"),
        (
            ["evaluate", "--model", "./m", "--precision", "fp16"],
            ValueError,
            "--precision takes auto, float32, bfloat16",
        ),
        (["recover", "--prune", "last:2", "--train_tokens", "0"], ValueError, r"--train_tokens\) .* got 0"),
        (["recover", "--prune", "last:2", "--train_tokens", "-1000"], ValueError, "got -1000"),
        (["recover", "--prune", "last:2", "--chat_fraction", "-0.2"], ValueError, "got -0.2"),
        (["recover", "--prune", "last:2", "--teacher_data", "./no-data"], FileNotFoundError, "No teacher data at"),
        (["recover", "--prune", "last:2", "--teacher_data", "x", "--overwrite_teacher_data"], ValueError, "is 'x'"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, monkeypatch, argv, error, match):
    monkeypatch.chdir(tmp_path)
    import transformers

    import hf_recover.base.defaults

    def refuse(*args, **kwargs):
        pytest.fail("loaded a model before validating")

    monkeypatch.setattr(hf_recover.base.defaults, "load_default_teacher", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(error, match=match):
        cli([*argv, "--output_dir", str(tmp_path / "out")] if argv[0] != "evaluate" else argv)


def test_unknown_yaml_key_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("teacher: default\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit, match="unknown keys \\['learning_rat'\\]"):
        cli(["recover", "--config", str(tmp_path / "bad.yaml")])


def test_console_script_help_lists_every_command():
    import re

    from hf_recover.cli import COMMANDS, command_module

    everything = {"demo", "importance", "prune", "select", "generate", "cache", "recover", "evaluate", "compare"}
    assert set(COMMANDS) == everything | {"push"}
    out = subprocess.run(
        [sys.executable, "-m", "hf_recover.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "{" + ",".join(COMMANDS) + "}" in out  # argparse's list of the subcommands
    for command in COMMANDS:
        assert re.search(rf"^ +{command} +\S", out, re.MULTILINE), command  # listed with its summary
        assert command_module(command).make_parser().format_help().startswith(f"usage: hf-recover {command}")
    with pytest.raises(ValueError, match="Unknown command 'magic'"):
        command_module("magic")


def test_recovered_model_reloads_with_identical_logits(workspace):
    ws = workspace
    cli(["recover", "--teacher", str(ws / "teacher"), "--prune", "remove:1,4", "--output_dir", str(ws / "r"),
         "--dataset", str(ws / "data"), *FAST, *TRAIN])  # fmt: skip
    from transformers import AutoModelForCausalLM

    a, b = AutoModelForCausalLM.from_pretrained(ws / "r"), load_pruned(ws / "r")
    ids = torch.tensor([[5, 9, 20, 33, 7]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert a.config.num_hidden_layers == 4


def test_evaluate_runs_local_lm_eval_tasks_offline(workspace, capsys):
    pytest.importorskip("lm_eval")
    ws = workspace
    tasks = Path(__file__).resolve().parents[1] / "examples" / "lm_eval_tasks"
    cli(["evaluate", "--model", str(ws / "teacher"), "--teacher", str(ws / "teacher"), "--tasks", "hf_recover_facts",
         "--include_path", str(tasks), "--limit", "4", "--output_file", str(ws / "tasks.json"),
         *data_flags(ws, "evaluate")])  # fmt: skip
    figures = json.loads((ws / "tasks.json").read_text())
    acc = figures["lm_eval"]["recovered"]["hf_recover_facts"]["acc"]
    assert 0.0 <= acc <= 1.0
    # The same model as its own teacher retains exactly all of its capability.
    assert figures["lm_eval"]["teacher"]["hf_recover_facts"]["acc"] == acc
    assert figures["capability_retention"] == pytest.approx(1.0) or acc == 0.0
    assert "hf_recover_facts" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, teacher_dtype",
    [
        (["--prune", "last:2", "--teacher_dtype", "bfloat16"], torch.bfloat16),
        (["--student", "STUDENT", "--teacher_dtype", "float16"], torch.float16),
        (["--prune", "last:2"], torch.float32),  # auto: as saved (float32 here)
    ],
)
def test_recover_loads_the_teacher_in_teacher_dtype(workspace, monkeypatch, flags, teacher_dtype):
    import hf_recover.recovery

    ws = workspace
    if "STUDENT" in flags:
        cli(["prune", "--model", str(ws / "teacher"), "--prune", "last:2", "--output_dir", str(ws / "student")])
        flags = [str(ws / "student") if f == "STUDENT" else f for f in flags]
    seen = {}

    class SetupDone(Exception):
        pass

    def capture(*, teacher, student, **kwargs):
        seen.update(teacher=teacher, student=student)
        raise SetupDone

    monkeypatch.setattr(hf_recover.recovery, "run_recovery", capture)
    with pytest.raises(SetupDone):
        cli(["recover", "--teacher", str(ws / "teacher"), *flags, "--output_dir", str(ws / "out"),
             "--dataset", str(ws / "data"), *FAST, *TRAIN])  # fmt: skip
    assert {p.dtype for p in seen["teacher"].parameters()} == {teacher_dtype}
    assert {p.dtype for p in seen["student"].parameters()} == {torch.float32}  # the student trains in float32


def test_compare_distils_from_the_teacher_in_teacher_dtype(workspace, monkeypatch):
    import hf_recover.recovery

    ws = workspace
    seen = []

    class SetupDone(Exception):
        pass

    def capture(*, teacher, student, **kwargs):
        seen.append((teacher, student))
        raise SetupDone

    monkeypatch.setattr(hf_recover.recovery, "run_recovery", capture)
    with pytest.raises(SetupDone):
        cli(["compare", "--teacher", str(ws / "teacher"), "--prune", "last", "--strategies", "ce_only",
             "--n_remove", "2", "--teacher_dtype", "bfloat16", "--output_dir", str(ws / "lab"),
             *data_flags(ws, "compare"), "--use_cpu"])  # fmt: skip
    teacher, student = seen[0]
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in student.parameters()} == {torch.float32}


@pytest.mark.parametrize("command", ["demo", "recover"])
def test_demo_and_recover_train_with_the_depth_recovery_preset(command):
    from hf_recover import DistillationConfig
    from hf_recover.cli import command_module

    parser = command_module(command).make_parser()
    recover_args, data_args, _, config = parser.parse_args_into_dataclasses([])
    for name, value in DistillationConfig.DEPTH_RECOVERY_RECIPE.items():
        assert getattr(config, name) == value, name
    assert data_args.calibration_blocks == 64  # enough tokens for the healing maps
    if command == "demo":  # the angular span, healed locally: what measured best after the demo's budget
        assert PruneSpec.parse(recover_args.prune).to_dict() == {
            "depth": {"method": "angular", "n": 6, "heal": "local"}
        }
        assert (config.max_steps, config.per_device_train_batch_size, data_args.max_length) == (120, 2, 256)
    # a flag still overrides the preset
    *_, changed = parser.parse_args_into_dataclasses(["--learning_rate", "3e-5", "--gamma", "0"])
    assert (changed.learning_rate, changed.gamma) == (3e-5, 0.0)


def test_named_blocks_with_healing_get_calibration_data(workspace):
    """`remove:...:heal=lstsq` scores nothing but heals: the calibration data must still reach prune_depth."""
    assert PruneSpec.parse("remove:1,2:heal=lstsq").needs_calibration
    assert not PruneSpec.parse("remove:1,2").needs_calibration
    ws = workspace
    cli(["prune", "--model", str(ws / "teacher"), "--prune", "remove:1,2:heal=lstsq", "--output_dir", str(ws / "s"),
         *data_flags(ws, "prune")])  # fmt: skip
    assert (ws / "s" / "pruned_config.json").is_file()


def test_compare_lab_caches_the_teacher_once_for_logits_only_strategies(workspace):
    from hf_recover.distill.teacher_cache import load_teacher_cache

    ws = workspace
    common = ["compare", "--teacher", str(ws / "teacher"), "--prune", "last", "--strategies", "logits_kd",
              "compound", "--n_remove", "2", "--max_steps", "2", "--curve_points", "1", "--use_cpu",
              *data_flags(ws, "compare")]  # fmt: skip
    cli([*common, "--output_dir", str(ws / "cached"), "--cache_teacher", "--cache_top_k", "320"])  # the vocabulary
    cli([*common, "--output_dir", str(ws / "online")])  # fmt: skip
    cached = json.loads((ws / "cached" / "results.json").read_text())
    online = json.loads((ws / "online" / "results.json").read_text())
    assert [r["teacher"] for r in cached] == ["cache", "online"]  # compound compares hidden states: online
    assert [r["teacher"] for r in online] == ["online", "online"]
    cache = load_teacher_cache(ws / "cached" / "teacher-cache")
    assert cache.metadata["num_rows"] == 2 * 2  # the rows the budget consumes: 2 steps of 2
    assert cache.temperatures == (2.0,)
    for c, o in zip(cached, online, strict=True):  # a full-vocabulary cache (float16 log-probs) = online KD
        assert c["validation"]["recovered"] == pytest.approx(o["validation"]["recovered"], rel=1e-3)


TEXT = {"dataset", "dataset_weights", "text_column", "data_seed_value"}
TRAINING = TEXT | {"max_length", "max_train_documents"}
CALIBRATION = TRAINING | {"calibration_blocks"}
EVALUATION = TEXT | {"ood_dataset", "eval_max_length", "eval_blocks", "held_out"}


@pytest.mark.parametrize(
    "command, shown",
    [
        ("cache", TRAINING),
        ("importance", CALIBRATION),
        ("prune", CALIBRATION),
        ("select", CALIBRATION | {"eval_blocks"}),
        ("evaluate", EVALUATION),
        ("recover", CALIBRATION | EVALUATION),
        ("demo", CALIBRATION | EVALUATION),
        ("compare", CALIBRATION | EVALUATION),
        ("generate", set()),
        ("push", set()),
    ],
)
def test_every_command_shows_the_data_flags_it_reads_and_no_other(command, shown):
    """`cache` and `evaluate` read no calibration blocks; `prune`, `importance` and `cache` measure no perplexity."""
    from hf_recover.cli import command_module

    flags = {action.dest for action in command_module(command).make_parser()._actions}
    assert flags & (CALIBRATION | EVALUATION) == shown


@pytest.mark.parametrize("command", ["prune", "recover", "select", "compare"])
def test_every_command_takes_its_prune_specs_by_one_flag(command):
    parser = command_module(command).make_parser()
    assert "--prune" in {option for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("command, former", [("select", "--candidates"), ("compare", "--prunings")])
def test_the_former_prune_spec_flags_still_work(command, former):
    parser = command_module(command).make_parser()
    (now,) = parser.parse_args_into_dataclasses(["--prune", "last:2", "remove:1"])[:1]
    (before,) = parser.parse_args_into_dataclasses([former, "last:2", "remove:1"])[:1]
    assert now.prune == before.prune == ["last:2", "remove:1"]


def test_precision_is_checked_and_the_demo_follows_the_hardware():
    with pytest.raises(ValueError, match="--precision takes auto, float32, bfloat16"):
        command_module("recover").make_parser().parse_args_into_dataclasses(["--precision", "half"])
    (recover_args, *_) = command_module("recover").make_parser().parse_args_into_dataclasses([])
    assert recover_args.precision is None  # recover: --bf16 decides, as in Trainer
    (demo_args, *_) = command_module("demo").make_parser().parse_args_into_dataclasses([])
    assert demo_args.precision == "auto"  # the demo: bfloat16 where the hardware has it


def test_the_answer_filter_flags_build_the_filter_training_reads():
    from hf_recover.distill.answer_filter import GOOD_ANSWERS, KEEP_ALL_ANSWERS

    parser = command_module("recover").make_parser()

    def answer_filter(argv):
        mixture = next(a for a in parser.parse_args_into_dataclasses(argv) if hasattr(a, "teacher_data_settings"))
        return mixture.teacher_data_settings()["answer_filter"]

    assert answer_filter([]) == GOOD_ANSWERS
    assert answer_filter(["--no_filter_answers"]) == KEEP_ALL_ANSWERS
    capped = answer_filter(["--max_answer_tokens", "200"])
    assert capped.max_answer_tokens == 200 and capped.finished_only and capped.drop_refusals
    assert capped.max_repeated_ngram_rate == GOOD_ANSWERS.max_repeated_ngram_rate
