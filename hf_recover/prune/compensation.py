"""The old name of `hf_recover.prune.width_healing` (width pruning healed without training): importable until
hf_recover 0.2.0, with a `DeprecationWarning`; every name is the new module's."""

import warnings

from . import width_healing

warnings.warn(
    "hf_recover.prune.compensation moved to hf_recover.prune.width_healing; import it from there (the old path is "
    "removed in hf_recover 0.2.0).",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str):
    return getattr(width_healing, name)
