"""hf_recover's version, written once: `pyproject.toml` reads it from here, the package exports it."""

__version__ = "0.1.0"
