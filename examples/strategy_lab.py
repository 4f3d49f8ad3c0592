"""The strategy lab: which blocks to remove, and which recovery strategy, at equal token budgets.

    python examples/strategy_lab.py                      # about 50 minutes on 2 CPU cores
    python examples/strategy_lab.py --prune importance last --strategies ce_only compound --max_steps 10
    python examples/strategy_lab.py --max_steps 500 --per_device_train_batch_size 16 --eval_blocks 128   # a GPU

Same as `hf-recover compare` (the lab itself is `hf_recover.lab`): pruning choices (block importance vs the
last blocks vs the contiguous blocks of smallest angular distance) x recovery strategies (CE only, logits KD,
compound CE + KD + hidden alignment, skew KL + FDD) on the embedded SmolLM2-135M and the default corpus. Writes
`results.md`, `results.json`, recovery curves per strategy and the block-importance plot to `--output_dir`
(default `outputs/lab`).
"""

import sys

from hf_recover.cli import main


def run(argv: list[str] | None = None):
    return main(["compare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    run()
