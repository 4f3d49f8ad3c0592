"""The old name of `hf_recover.prune.width_healing` (width pruning healed without training): importable until
hf_recover 0.2.0, with a `DeprecationWarning`; every name is the new module's."""

from ..base.renamed import forward_to
from . import width_healing

__getattr__ = forward_to(__name__, width_healing)
