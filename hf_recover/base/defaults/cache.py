"""The old name of `hf_recover.base.defaults.assets` (where the embedded assets are cached and checked): importable
until hf_recover 0.2.0, with a `DeprecationWarning`; every name is the new module's."""

from ..renamed import forward_to
from . import assets

__getattr__ = forward_to(__name__, assets)
