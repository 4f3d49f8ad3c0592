"""`hf-recover demo`: the README's main job, on the embedded default, in one command.

    hf-recover demo                      # about 8 minutes on 2 CPU cores
    hf-recover demo --max_steps 240      # any `hf-recover recover` flag works

It takes SmolLM2-135M-Instruct (30 blocks) and the default offline corpus, finds on 64 calibration blocks of
256 tokens the 6 contiguous blocks whose input and output are closest in angular distance (Gromov et al., 2024),
removes them (20%), heals the cut with a least-squares map folded into the block before it (ReplaceMe,
Shopkhoev et al., 2025), recovers the 24-block student with `DistillationConfig.for_depth_recovery()` for
120 steps of 2 × 256 tokens (61,440 tokens), and prints teacher / pruned /
recovered perplexity on `validation` and `ood` (a domain never trained on), recovery %, retention,
parameters and wall time. The recovered model folder (weights, tokenizer, `pruned_config.json`, model
card) and `loss_curve.png` go to `outputs/demo`.
"""

from __future__ import annotations

from ..distill.config import DistillationConfig
from . import recover

DEMO_DEFAULTS = {
    "teacher": "default",
    # Measured on this protocol (validation / ood perplexity before training; teacher 16.08 / 38.50): block
    # influence's 6 blocks [12-15, 17, 25] 41.36 / 83.31; the angular span [13-18] 36.44 / 74.84 (also what
    # removing one block at a time by KL to the teacher chooses); healed on 64 x 256 tokens 27.17 / 60.12.
    "prune": "angular:6:heal=lstsq",
    "output_dir": "outputs/demo",
    "max_length": 256,
    "max_train_documents": 400,
    **DistillationConfig.DEPTH_RECOVERY_RECIPE,
    "max_steps": 120,
}


def make_parser(subparsers=None):
    return recover.make_parser(subparsers, name="demo", doc=__doc__, defaults=DEMO_DEFAULTS)


main = recover.main
