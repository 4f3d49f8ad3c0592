"""`hf-recover demo`: the README's main job, on the embedded default, in one command.

    hf-recover demo                      # about 15 minutes on 2 CPU cores
    hf-recover demo --max_steps 200      # any `hf-recover recover` flag works

It takes SmolLM2-135M-Instruct (30 blocks) and the default offline corpus, scores the blocks by
block influence on calibration text, removes the 6 least important (20%), recovers the 24-block
student with the compound loss `0.5·CE + 0.5·T²·KL + 0.1·(1 − cos)` (T = 2, `kept` layer map) for
60 steps of 4 × 256 tokens, and prints teacher / pruned / recovered perplexity on `validation` and
`ood` (a domain never trained on), recovery %, retention, parameters and wall time. The recovered
model folder (weights, tokenizer, `pruned_config.json`, model card) and `loss_curve.png` go to
`outputs/demo`.
"""

from __future__ import annotations

from ..config import DistillationConfig
from . import recover

DEMO_DEFAULTS = {
    "teacher": "default",
    "prune": "importance:6:heal=cosine",
    "output_dir": "outputs/demo",
    "max_length": 256,
    "max_train_documents": 400,
    **DistillationConfig.DEPTH_RECOVERY_RECIPE,
    "max_steps": 60,
}


def make_parser(subparsers=None):
    return recover.make_parser(subparsers, name="demo", doc=__doc__, defaults=DEMO_DEFAULTS)


main = recover.main
