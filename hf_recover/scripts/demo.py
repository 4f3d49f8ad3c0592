"""`hf-recover demo`: prune and recover the embedded default model in one command, and print the table.

    hf-recover demo                      # about 10 minutes on 2 CPU cores; the first run writes the teacher data too
    hf-recover demo --max_steps 240      # any `hf-recover recover` flag works

It takes SmolLM2-135M-Instruct (30 blocks) and the default offline corpus, finds on 64 calibration blocks of
256 tokens the 6 contiguous blocks whose input and output are closest in angular distance (Gromov et al., 2024),
removes them (20% of the blocks), heals the cut with a least-squares map folded into the block before it (ReplaceMe,
Shopkhoev et al., 2025) and then trains that block alone for 200 steps to reproduce the teacher's hidden state after
the cut (block-local distillation), and recovers the 24-block student with `DistillationConfig.for_depth_recovery()` on
61,440 tokens: 70% the corpus, 30% the teacher's own answers to prompts it wrote itself, sampled, of which it keeps
those that finish within 256 tokens, do not refuse and do not loop (written once, then read from the cache; the first
build, about 31 minutes here, is most of the extra time of the first run). It prints teacher / pruned / healed /
recovered perplexity on `validation`, `ood` (never trained on) and the held-out domains, recovery %, retention,
the assistant's figures on held-out prompts (teacher-forced on the teacher's answers; then the recovered student's
own answers: finished, refusals, repetition, length, the teacher's log-probability of them, and instruction
following on 40 prompts with verifiable instructions), parameters, wall time, and three prompts answered by each
model side by side. The teacher's and the cut's figures are cached: a second run reads them. The recovered model
folder (weights, tokenizer, `pruned_config.json`, model card) and `loss_curve.png` go to `outputs/demo`.
"""

from __future__ import annotations

from ..recovery import DEMO_DEFAULTS
from . import recover


def make_parser(subparsers=None):
    return recover.make_parser(subparsers, name="demo", doc=__doc__, defaults=DEMO_DEFAULTS)


main = recover.main
