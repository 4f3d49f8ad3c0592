"""Import paths from before the package was arranged in parts keep working, with a DeprecationWarning."""

import importlib
import sys
import warnings

import pytest

import hf_recover
from hf_recover.moved_modules import MOVED_MODULES, new_path


def _fresh_import(monkeypatch, name):
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    return importlib.import_module(name)


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_path_is_the_new_module_with_a_warning(monkeypatch, old):
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED_MODULES[old]}"):
        alias = _fresh_import(monkeypatch, old)
    new = importlib.import_module(MOVED_MODULES[old])
    public = [name for name in dir(new) if not name.startswith("__")]
    assert public and all(getattr(alias, name) is getattr(new, name) for name in public)


def test_names_under_a_moved_package_move_with_it(monkeypatch):
    with pytest.warns(DeprecationWarning):
        depth = _fresh_import(monkeypatch, "hf_recover.pruning.depth")
    assert depth.prune_depth is importlib.import_module("hf_recover.prune.depth").prune_depth
    assert new_path("hf_recover.losses.topk") == "hf_recover.base.losses.topk"
    assert new_path("hf_recover.pruning.heads") == "hf_recover.prune.attention_heads"
    assert new_path("hf_recover.prune.depth") is None  # the new paths are not aliases


def test_documented_from_imports_keep_working(monkeypatch):
    from hf_recover.base.loading import load_pruned
    from hf_recover.base.losses import DIVERGENCES, LMHeadInputs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in ("hf_recover.losses", "hf_recover.pruning"):
            for loaded in [m for m in sys.modules if m.startswith(name)]:
                monkeypatch.delitem(sys.modules, loaded)
        from hf_recover.losses import DIVERGENCES as old_divergences
        from hf_recover.losses import LMHeadInputs as old_inputs
        from hf_recover.losses.topk import sample_tail
        from hf_recover.pruning import load_pruned as old_load_pruned  # once re-exported there
    assert (old_divergences, old_inputs, old_load_pruned) == (DIVERGENCES, LMHeadInputs, load_pruned)
    assert sample_tail is importlib.import_module("hf_recover.base.losses.topk").sample_tail


def test_every_public_name_resolves():
    for name in hf_recover.__all__:
        assert getattr(hf_recover, name) is not None, name
    assert sorted(dir(hf_recover)) == sorted(hf_recover.__all__)


def test_the_finder_is_asked_last_and_no_file_stands_at_an_old_path():
    """Every other import goes by the aliases' finder untouched: it sits last on `sys.meta_path`, and it is reached
    for an old path because no module file stands there (which would also load a second copy of a module)."""
    from importlib.machinery import PathFinder

    from hf_recover.moved_modules import REMOVED_IN, _MovedModuleFinder

    ours = [i for i, finder in enumerate(sys.meta_path) if isinstance(finder, _MovedModuleFinder)]
    assert len(ours) == 1 and ours[0] > sys.meta_path.index(PathFinder)
    assert _MovedModuleFinder().find_spec("hf_recover.prune.depth", None) is None  # a new path: not ours
    package = hf_recover.__path__
    for old in MOVED_MODULES:
        top = old.split(".")[1]  # hf_recover.<top>...: no file or folder of that name in the package
        assert PathFinder.find_spec(f"hf_recover.{top}", package) is None, old
    assert tuple(map(int, REMOVED_IN.split("."))) > tuple(map(int, hf_recover.__version__.split(".")))


@pytest.mark.parametrize(
    "old, new",
    [("hf_recover.base.defaults.cache", "hf_recover.base.defaults.assets"),
     ("hf_recover.prune.compensation", "hf_recover.prune.width_healing")],
)  # fmt: skip
def test_renamed_modules_keep_their_old_name_with_a_warning(monkeypatch, old, new):
    """The embedded assets' cache and width healing were renamed for what they hold; the old names still give the
    new modules' objects, until REMOVED_IN."""
    from hf_recover.moved_modules import REMOVED_IN

    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}.* removed in hf_recover {REMOVED_IN}"):
        alias = _fresh_import(monkeypatch, old)
    module = importlib.import_module(new)
    public = [name for name in vars(module) if not name.startswith("_")]
    assert len(public) > 3 and all(getattr(alias, name) is getattr(module, name) for name in public)
    with pytest.raises(AttributeError):
        alias.no_such_name  # noqa: B018
