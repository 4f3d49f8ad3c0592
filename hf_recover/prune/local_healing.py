"""Block-local distillation of a healed cut: after the least-squares map, the block before each removed span is
trained alone to reproduce the teacher's hidden state after the span.

The least-squares heal (`hf_recover.prune.healing`) is the zero-step, linear special case of training a stand-in for
a removed span: LLM-Streamline (Chen et al., "LLM-Streamline: Streamlining Large Language Models via Layer Pruning
and Lightweight Training", ICLR 2025) trains a light replacement against the teacher's hidden state after the span;
Puzzle (Bercovich et al., "Puzzle: Distillation-Based NAS for Inference-Optimized LLMs", 2025) distils each replaced
block locally, its input from the teacher and its output matched to the teacher's, before any global distillation;
Wanda++ (2025) aligns pruned blocks by a few local steps. Here, for every healed span, the block before it (whose
`down_proj` already holds the map) is trained for `steps` AdamW steps:

- its inputs are what it receives in the student on calibration data (earlier cuts included), with the attention
  mask and rotary embeddings of that same forward, captured by a hook and reused;
- its output is compared with the teacher's hidden state after the span (the output of the span's last block),
  both RMS-normalised per token (`nmse`): what the next block's norm reads. Plain MSE (`mse`) is dominated by the
  few channels of outsized activation that decoder-only models carry;
- nothing else of the model changes, and no parameter is added: the student stays a plain model of its class.

It needs no logits and no backward pass through the rest of the model: each step runs one block on one calibration
batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base.anatomy import decoder_layers
from .calibration import StopCalibrationForward, calibration_pass

LOCAL_OBJECTIVES = ("nmse", "mse")


def normalised_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the RMS-normalised hidden states `(tokens, hidden)`."""
    output = output.float() / output.float().square().mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    target = target.float() / target.float().square().mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    return (output - target).square().mean()


def relative_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the target's mean square, both `(tokens, hidden)`."""
    return (output.float() - target.float()).square().mean() / target.float().square().mean().clamp_min(1e-12)


OBJECTIVES = {"nmse": normalised_mse, "mse": relative_mse}


def block_inputs(
    model: nn.Module, block: int, data: Any, *, batch_size: int, max_batches: int | None
) -> list[dict[str, Any]]:
    """Per calibration batch, what block `block` receives in a forward of `model` (its hidden states and keyword
    arguments: attention mask, rotary embeddings, ...) and which tokens are real; each forward ends there."""
    records: list[dict[str, Any]] = []

    def register(valid: list[torch.Tensor]) -> list[Any]:
        def keep(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            records.append({"hidden": hidden, "kwargs": rest, "mask": valid[0].bool()})
            raise StopCalibrationForward

        return [decoder_layers(model)[block].register_forward_pre_hook(keep, with_kwargs=True)]

    calibration_pass(model, data, register, batch_size=batch_size, max_batches=max_batches, desc="Block inputs")
    return [_trainable(record) for record in records]


def block_outputs(model: nn.Module, block: int, data: Any, *, batch_size: int, max_batches: int | None) -> list:
    """The output of block `block` on every calibration batch (whole sequences); each forward ends there."""
    outputs: list[torch.Tensor] = []

    def register(valid: list[torch.Tensor]) -> list[Any]:
        def keep(module, args, output):
            outputs.append(output[0] if isinstance(output, tuple) else output)
            raise StopCalibrationForward

        return [decoder_layers(model)[block].register_forward_hook(keep)]

    calibration_pass(model, data, register, batch_size=batch_size, max_batches=max_batches, desc="Teacher's states")
    return [_trainable(output) for output in outputs]


def _trainable(value: Any) -> Any:
    """A copy of what a calibration pass captured (inference tensors) that autograd can use."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _trainable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_trainable(v) for v in value)
    return value


def train_block(
    block: nn.Module,
    inputs: list[dict[str, Any]],
    targets: list[torch.Tensor],
    *,
    steps: int,
    learning_rate: float,
    objective: str = "nmse",
    seed: int = 0,
) -> list[float]:
    """Train `block` alone, `steps` AdamW steps on randomly drawn calibration batches, so that its output on each
    batch's `inputs` matches `targets` on the real tokens; returns the loss of every step."""
    loss_fn = OBJECTIVES[objective]
    params = [p for p in block.parameters()]
    flags = [p.requires_grad for p in params]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    was_training = block.training
    block.train()
    losses = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                k = int(torch.randint(len(inputs), (1,), generator=generator))
                record = inputs[k]
                output = block(record["hidden"], **record["kwargs"])
                output = output[0] if isinstance(output, tuple) else output
                mask = record["mask"]
                loss = loss_fn(output[mask], targets[k][mask])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    finally:
        for param, flag in zip(params, flags):
            param.requires_grad_(flag)
            param.grad = None
        block.train(was_training)
    return losses
