"""`hf_recover/__init__.py` names each public name three times: in `__all__`, in the lazy `_EXPORTS` table (name ->
module) and in the `TYPE_CHECKING` imports that type checkers and IDEs read. The three agree."""

from __future__ import annotations

import ast
from pathlib import Path

import hf_recover

INIT = Path(hf_recover.__file__)


def type_checking_imports(source: str) -> dict[str, str]:
    """`{name: module}` of the imports under `if TYPE_CHECKING:` (modules relative to the package, as in
    `_EXPORTS`)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return {
                alias.asname or alias.name: statement.module
                for statement in node.body
                if isinstance(statement, ast.ImportFrom) and statement.level == 1
                for alias in statement.names
            }
    return {}


def disagreements(exports: dict[str, str], imports: dict[str, str], names: list[str]) -> dict[str, list]:
    """What one of the three lists has and another lacks (or places in another module)."""
    return {
        "lazy, not imported for type checkers": sorted(set(exports) - set(imports)),
        "imported for type checkers, not lazy": sorted(set(imports) - set(exports)),
        "in another module": sorted(n for n in set(exports) & set(imports) if exports[n] != imports[n]),
        "__all__ differs": sorted(set(names) ^ {"__version__", *exports}),
    }


def test_all_the_lazy_exports_and_the_type_checking_imports_agree():
    imports = type_checking_imports(INIT.read_text(encoding="utf-8"))
    assert len(imports) > 40
    found = disagreements(hf_recover._EXPORTS, imports, hf_recover.__all__)
    assert found == {key: [] for key in found}
    assert len(hf_recover.__all__) == len(set(hf_recover.__all__))  # no name twice


def test_the_agreement_check_sees_a_name_missing_or_misplaced():
    source = "if TYPE_CHECKING:\n    from .prune import block_importance, prune_depth\n"
    imports = type_checking_imports(source)
    assert imports == {"block_importance": "prune", "prune_depth": "prune"}
    exports = {"block_importance": "prune", "prune_depth": "prune.depth", "neuron_importance": "prune"}
    found = disagreements(exports, imports, ["__version__", "block_importance"])
    assert found == {
        "lazy, not imported for type checkers": ["neuron_importance"],
        "imported for type checkers, not lazy": [],
        "in another module": ["prune_depth"],
        "__all__ differs": ["neuron_importance", "prune_depth"],
    }
