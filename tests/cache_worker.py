"""Worker for tests/test_teacher_cache.py: build a teacher cache, launched by torchrun or called in-process.

torchrun --standalone --nproc_per_node 2 tests/cache_worker.py OUTPUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def build(output_dir: str) -> None:
    from conftest import TINY_TEXTS, build_tiny_model, build_tiny_tokenizer
    from datasets import Dataset

    from hf_recover import prepare_recovery_dataset
    from hf_recover.distill.teacher_cache import cache_teacher_outputs

    tokenizer = build_tiny_tokenizer()
    texts = [text[: 12 + 7 * i] for i, text in enumerate(TINY_TEXTS * 2)]
    data = prepare_recovery_dataset(Dataset.from_dict({"text": texts}), tokenizer, max_length=24, packing=False)
    teacher = build_tiny_model(seed=1)
    cache_teacher_outputs(
        teacher,
        data,
        output_dir,
        top_k=5,
        tail_samples=4,  # drawn per shard with its own seed: the same whichever process builds it
        batch_size=2,
        shard_size=3,
        tokenizer=tokenizer,
        show_progress=False,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    build(sys.argv[1])
