"""Import paths from before the package was arranged in parts (base, distill, prune, publish), kept working.

`import hf_recover.trainer` or `from hf_recover.losses import LMHeadInputs` still work: the old module name is an
alias whose attributes are the new module's, and importing it warns once with a `DeprecationWarning` naming the new
path and the release that removes it (`REMOVED_IN`). `MOVED_MODULES` is the one table of what moved where; a name
under a moved package (`hf_recover.pruning.depth`) moves with it (`hf_recover.prune.depth`) unless the table names it.

The finder that makes the aliases sits last on `sys.meta_path`: Python asks it only about a module no other finder
found (no file stands at an old path any more), so every other import goes by it untouched.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

from .base.renamed import REMOVED_IN  # the release without these aliases: an old path stops importing there

MOVED_MODULES = {
    "hf_recover.constants": "hf_recover.base.constants",
    "hf_recover.data": "hf_recover.base.data",
    "hf_recover.pruned_config": "hf_recover.base.pruned_config",
    "hf_recover.loading": "hf_recover.base.loading",
    "hf_recover.evaluation": "hf_recover.base.evaluation",
    "hf_recover.reporting": "hf_recover.base.reporting",
    "hf_recover.losses": "hf_recover.base.losses",
    "hf_recover.metrics": "hf_recover.base.metrics",
    "hf_recover.defaults": "hf_recover.base.defaults",
    "hf_recover.config": "hf_recover.distill.config",
    "hf_recover.trainer": "hf_recover.distill.trainer",
    "hf_recover.teacher": "hf_recover.distill.teacher",
    "hf_recover.alignment": "hf_recover.distill.alignment",
    "hf_recover.heads": "hf_recover.distill.lm_head",
    "hf_recover.teacher_cache": "hf_recover.distill.teacher_cache",
    "hf_recover.cached_training": "hf_recover.distill.cached_training",
    "hf_recover.fingerprints": "hf_recover.distill.fingerprints",
    "hf_recover.card": "hf_recover.publish.card",
    "hf_recover.card_merge": "hf_recover.publish.card_merge",
    "hf_recover.trainer_card": "hf_recover.publish.trainer_card",
    "hf_recover.hub": "hf_recover.publish.hub",
    "hf_recover.pruning": "hf_recover.prune",
    "hf_recover.pruning.heads": "hf_recover.prune.attention_heads",
    "hf_recover.pruning._model": "hf_recover.base.anatomy",
}
"""Old module path -> new module path."""

MOVED_NAMES = {"hf_recover.pruning": {"load_pruned": "hf_recover.base.loading"}}
"""Names an old module offered that now live elsewhere than its new module: old module -> {name: new module}."""


def new_path(old: str) -> str | None:
    """Where the module once imported as `old` lives now; None when it did not move."""
    for prefix in sorted(MOVED_MODULES, key=len, reverse=True):
        if old == prefix or old.startswith(prefix + "."):
            return MOVED_MODULES[prefix] + old[len(prefix) :]
    return None


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as an alias of the new module (last on `sys.meta_path`: asked only about what no
    other finder found, and no file stands at an old path, so no old name ever loads a second copy of a module)."""

    def find_spec(self, fullname, path, target=None):
        target_name = new_path(fullname)
        if target_name is None:
            return None
        target_spec = importlib.util.find_spec(target_name)
        if target_spec is None:
            return None
        return importlib.util.spec_from_loader(
            fullname, self, is_package=target_spec.submodule_search_locations is not None
        )

    def create_module(self, spec):
        return _Alias(spec.name)

    def exec_module(self, module):
        target = new_path(module.__name__)
        level, frame = 1, sys._getframe()  # point the warning at the import statement, not at importlib
        while frame is not None and (frame.f_code.co_filename == __file__ or "importlib" in frame.f_code.co_filename):
            frame, level = frame.f_back, level + 1
        warnings.warn(
            f"{module.__name__} moved to {target}; import it from there (the old path is removed in hf_recover "
            f"{REMOVED_IN}).",
            DeprecationWarning,
            stacklevel=level,
        )
        module._target = importlib.import_module(target)
        module._extra = MOVED_NAMES.get(module.__name__, {})
        if module.__spec__.submodule_search_locations is not None:
            module.__path__ = []  # a package: its submodules are found by this finder too


class _Alias(types.ModuleType):
    """A module whose attributes are those of the module it stands for."""

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_target", "_extra"):
            raise AttributeError(name)
        if name in self._extra:
            return getattr(importlib.import_module(self._extra[name]), name)
        return getattr(self._target, name)

    def __dir__(self):
        return sorted({*dir(self._target), *self._extra})


def install() -> None:
    """Put the finder last on `sys.meta_path`, once."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
