"""The package's layout rules: the parts import only downward, the logit losses stand alone, and each module stays
one readable concept.

The parts (see docs/architecture.md): `base` imports nothing of hf_recover above it; `prune` and `publish`
import only the base; `distill` imports the base and `publish` (its save hooks write the model card), never
`prune`; the face (the package's `__init__`, `cli`, `recovery`, `lab`, `moved_modules`, `scripts/`, `integrations/`)
may import everything, and nothing below it imports the face. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import hf_recover

PACKAGE = Path(hf_recover.__file__).parent

ALLOWED = {
    "base": {"base"},
    "prune": {"base", "prune"},
    "publish": {"base", "publish"},
    "distill": {"base", "publish", "distill"},
}
"""What each part may import, by the first name under `hf_recover`."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports, at any depth (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import x` imports x
    return found


def part_of(module: str) -> str | None:
    """`base`, `distill`, `prune` or `publish` for a module inside a part; None for the face and for outsiders."""
    parts = module.split(".")
    return parts[1] if parts[0] == "hf_recover" and len(parts) > 1 and parts[1] in ALLOWED else None


def upward_imports(path: Path) -> set[str]:
    """The hf_recover modules a module of a part imports against the rules (the face, or a part it may not use)."""
    part = part_of(module_name(path))
    if part is None:  # the face may import everything
        return set()
    ours = {module for module in imported_modules(path) if module.split(".")[0] == "hf_recover"}
    return {module for module in ours if part_of(module) not in ALLOWED[part]}  # None (the face) is never allowed


def test_the_parts_import_only_downward():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(wrong)
        for path in sorted(PACKAGE.rglob("*.py"))
        if (wrong := upward_imports(path))
    }
    assert offenders == {}


def test_the_direction_rule_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The check above fails where it should: the base reaching up to a part or the face, prune reaching distill."""
    fake = tmp_path / "hf_recover"
    (fake / "base").mkdir(parents=True)
    (fake / "prune").mkdir()
    (fake / "base" / "bad.py").write_text(
        "def f():\n    from .. import __version__\n    from ..prune.depth import prune_depth\n"
    )
    (fake / "prune" / "bad.py").write_text(
        "from ..distill.trainer import DistillationTrainer\nfrom ..base import data\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert upward_imports(fake / "base" / "bad.py") == {
        "hf_recover",
        "hf_recover.__version__",
        "hf_recover.prune.depth",
        "hf_recover.prune.depth.prune_depth",
    }
    assert upward_imports(fake / "prune" / "bad.py") == {
        "hf_recover.distill.trainer",
        "hf_recover.distill.trainer.DistillationTrainer",
    }


def test_losses_import_only_torch_and_constants():
    """`hf_recover.base.losses` is pure tensor code: torch, the standard library, `hf_recover.base.constants` and its
    own modules, nothing else of hf_recover or of the ecosystem (no transformers, no trainer state)."""
    folder = PACKAGE / "base" / "losses"
    for path in sorted(folder.glob("*.py")):
        allowed = ("hf_recover.base.losses", "hf_recover.base.constants", "torch", "__future__")
        foreign = {
            module
            for module in imported_modules(path)
            if not module.startswith(allowed) and module.split(".")[0] not in sys.stdlib_module_names
        }
        assert not foreign, f"{path.name} imports {sorted(foreign)}"


MAX_MODULE_LINES = 600


def test_no_module_grows_past_one_readable_concept():
    """A guard, not a target: a module near ~600 lines most likely holds more than one concept. Split it where its
    concepts part."""
    sizes = {
        path.relative_to(PACKAGE): len(path.read_text(encoding="utf-8").splitlines()) for path in PACKAGE.rglob("*.py")
    }
    assert sizes and {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}


REPOSITORY = PACKAGE.parent
CLI_SCRIPTS = "hf_recover.scripts"


def scripts_imports(path: Path) -> set[str]:
    """The modules of `hf_recover.scripts` (the CLI's commands) a file outside them imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {module for module in found if module == CLI_SCRIPTS or module.startswith(CLI_SCRIPTS + ".")}


def test_nothing_outside_the_cli_imports_its_scripts():
    """The commands parse and print; the library, the benchmarks, the examples and the tests import the modules that
    own what they need (the CLI reaches its commands through `hf_recover.cli.command_module`)."""
    folders = [REPOSITORY / name for name in ("benchmarks", "examples", "tests")]
    paths = [p for p in PACKAGE.rglob("*.py") if PACKAGE / "scripts" not in p.parents]
    paths += [p for folder in folders if folder.is_dir() for p in folder.rglob("*.py")]
    offenders = {
        str(path.relative_to(REPOSITORY)): sorted(wrong) for path in sorted(paths) if (wrong := scripts_imports(path))
    }
    assert len(paths) > 100 and offenders == {}, offenders


def test_the_scripts_rule_sees_an_import_of_a_command(tmp_path):
    bad = tmp_path / "bench.py"
    bad.write_text("import os\n\ndef f():\n    from hf_recover.scripts.compare import _pruning_spec\n")
    assert scripts_imports(bad) == {"hf_recover.scripts.compare", "hf_recover.scripts.compare._pruning_spec"}
    bad.write_text("import hf_recover.scripts.demo as demo\nfrom hf_recover.recovery import DEMO_DEFAULTS\n")
    assert scripts_imports(bad) == {"hf_recover.scripts.demo"}


def test_names_that_moved_out_of_the_face_are_still_imported_from_it():
    """`hf_recover.recovery` offered the mixture, split and assistant evaluation, plots and the lab's curves before
    they moved to the parts (and the lab) that own them: the old imports give the same objects."""
    import hf_recover.recovery as recovery
    from hf_recover import lab
    from hf_recover.base import chat_retention, reporting
    from hf_recover.distill import evaluation_cache, mixture

    owners = {
        mixture: ("teacher_mixture", "PROMPT_ROOM"),
        evaluation_cache: ("evaluate_splits",),
        chat_retention: ("evaluate_assistant", "answer_examples"),
        reporting: ("plot_loss_curves", "plot_recovery_curves"),
        lab: ("STRATEGIES", "ASSISTANT_POINT", "RecoveryCurve", "curve_steps", "tokens_to_reach"),
    }
    for owner, names in owners.items():
        for name in names:
            assert getattr(recovery, name) is getattr(owner, name), name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        recovery.nothing  # noqa: B018
