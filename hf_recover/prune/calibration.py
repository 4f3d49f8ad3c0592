"""One pass over calibration data with hooks that accumulate per-channel activation statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..base.anatomy import model_device
from ..base.data import iter_batches, num_batches

_MODEL_INPUTS = ("input_ids", "attention_mask")


class StopCalibrationForward(Exception):
    """Raised by a hook once a batch has given all a pass needs: the rest of the forward is skipped."""


def check_calibration_data(data: Any, what: str) -> None:
    if data is None:
        raise ValueError(f"{what} is ranked by activations on calibration data: pass data= (rows of input_ids).")


@torch.inference_mode()
def calibration_pass(
    model: torch.nn.Module,
    data: Any,
    register: Callable[[list[torch.Tensor]], list[Any]],
    *,
    batch_size: int,
    max_batches: int | None,
    desc: str,
) -> tuple[int, int]:
    """Run `model` on every batch of `data` with the hooks `register(valid)` installs; return (tokens, sequences).

    `valid` holds one tensor while a batch runs: its real-token mask `(B, T)` as floats (padding is 0), which the
    hooks use to leave padding out of their statistics. A hook may raise `StopCalibrationForward` to skip the rest
    of a batch's forward. The hooks are removed afterwards, even on error. Tensors the hooks keep are inference
    tensors: copy them (any op outside inference mode does) before using them with autograd.
    """
    valid: list[torch.Tensor] = []
    handles = register(valid)
    was_training = model.training
    model.eval()
    tokens = sequences = 0
    try:
        batches = iter_batches(
            data, batch_size=batch_size, max_batches=max_batches, device=model_device(model), columns=_MODEL_INPUTS
        )
        total = num_batches(data, batch_size=batch_size, max_batches=max_batches)
        for batch in tqdm(batches, total=total, desc=desc, leave=False):
            mask = batch.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(batch["input_ids"])
            valid[:] = [mask.float()]
            with contextlib.suppress(StopCalibrationForward):
                model.model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
            tokens += int(mask.sum())
            sequences += mask.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("The calibration data has no real token (attention_mask is all 0): nothing to score.")
    return tokens, sequences


def masked_square_sum(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum over real tokens of `x ** 2`, per trailing channel: `(B, T, *C)` with mask `(B, T)` -> float64 `C`."""
    x = x.float()
    mask = valid.reshape(*valid.shape, *([1] * (x.dim() - 2)))
    return (x.square() * mask).sum(dim=(0, 1)).double().cpu()
