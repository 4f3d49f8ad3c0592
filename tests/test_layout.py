"""The package's layout rules: the logit losses stand alone, and each module stays one readable concept."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import hf_recover

PACKAGE = Path(hf_recover.__file__).parent


def imported_roots(path: Path) -> set[str]:
    """Top-level names a module imports; relative imports as `.name` (`..` one level up)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            roots.add("." * node.level + module.split(".")[0] if node.level else module.split(".")[0])
    return roots


def test_losses_import_only_torch_and_constants():
    """`hf_recover.losses` is pure tensor code: torch, the standard library, `hf_recover.constants` and its own
    modules, nothing else of hf_recover or of the ecosystem (no transformers, no trainer state)."""
    folder = PACKAGE / "losses"
    own = {f".{path.stem}" for path in folder.glob("*.py")} | {"."}
    for path in sorted(folder.glob("*.py")):
        foreign = {
            name
            for name in imported_roots(path) - own - {"__future__", "torch", "..constants"}
            if name.lstrip(".") not in sys.stdlib_module_names or name.startswith(".")
        }
        assert not foreign, f"{path.name} imports {sorted(foreign)}"


def test_the_layout_rule_sees_a_forbidden_import(tmp_path):
    """The check above fails where it should: a module importing transformers or the trainer."""
    module = tmp_path / "bad.py"
    module.write_text("import transformers\nfrom ..trainer import DistillationTrainer\nfrom . import kernels\n")
    assert imported_roots(module) == {"transformers", "..trainer", "."}


MAX_MODULE_LINES = 600


def test_no_module_grows_past_one_readable_concept():
    """A module over ~600 lines holds more than one concept: split it by what its parts are about."""
    sizes = {
        path.relative_to(PACKAGE): len(path.read_text(encoding="utf-8").splitlines()) for path in PACKAGE.rglob("*.py")
    }
    assert sizes and {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}
