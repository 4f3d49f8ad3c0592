"""Worker for tests/test_trainer_ddp.py: a few DistillationTrainer steps, launched by torchrun or called in-process.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUTPUT_DIR PER_DEVICE_BATCH_SIZE

Writes `result.json` (the logged values) and `weights.safetensors` (student and projectors) into OUTPUT_DIR on the
main process. The global batch is `PER_DEVICE_BATCH_SIZE × processes`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

LOGGED = ("loss", "ce", "kd", "align", "fdd")


def run(output_dir: str, per_device_batch_size: int) -> None:
    from conftest import TINY_TEXTS, build_tiny_model, build_tiny_tokenizer
    from datasets import Dataset
    from safetensors.torch import save_file

    from hf_recover import DistillationConfig, DistillationTrainer, prepare_recovery_dataset

    texts = [text[: 12 + 7 * i] for i, text in enumerate(TINY_TEXTS * 2)]
    data = prepare_recovery_dataset(
        Dataset.from_dict({"text": texts}), build_tiny_tokenizer(), max_length=24, packing=False
    )
    teacher = build_tiny_model(seed=1)
    student = build_tiny_model(
        seed=2, num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1
    )
    args = DistillationConfig(
        output_dir=output_dir,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=per_device_batch_size,
        learning_rate=1e-3,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        gamma=0.3,
        delta=0.3,
        layer_map="uniform",
    )
    trainer = DistillationTrainer(student, teacher, args, train_dataset=data)
    trainer.train()
    if trainer.is_world_process_zero():
        history = trainer.state.log_history
        result = {key: [entry[key] for entry in history if key in entry] for key in LOGGED}
        result["world_size"] = trainer.args.world_size
        Path(output_dir, "result.json").write_text(json.dumps(result))
        weights = {f"student.{n}": p.detach().contiguous() for n, p in trainer.model.named_parameters()}
        weights.update({f"projectors.{n}": p.detach().contiguous() for n, p in trainer.projectors.named_parameters()})
        save_file(weights, str(Path(output_dir, "weights.safetensors")))


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], int(sys.argv[2]))
