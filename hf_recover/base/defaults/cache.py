"""The old name of `hf_recover.base.defaults.assets` (where the embedded assets are cached and checked): importable
until hf_recover 0.2.0, with a `DeprecationWarning`; every name is the new module's."""

import warnings

from . import assets

warnings.warn(
    "hf_recover.base.defaults.cache moved to hf_recover.base.defaults.assets; import it from there (the old path is "
    "removed in hf_recover 0.2.0).",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str):
    return getattr(assets, name)
