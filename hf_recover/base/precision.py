"""The float type the models compute in: bfloat16 where the hardware has it, float32 where it does not.

Training in bfloat16 is `Trainer`'s own `bf16=True` (`--bf16`): autocast over float32 weights, the optimizer's state
in float32. hf_recover's own evaluation and generation follow the same setting through `autocast_to(bf16, device)`,
so a run under `--bf16` measures its models the way it trains them. Whatever the compute type, the figures are
float32: perplexities, log-probabilities and divergences come from float32 log-softmax of the logits (the losses
upcast inside autocast). `bf16_supported` says whether a device computes bfloat16 natively (a CPU with AVX512-BF16
or AMX, an NVIDIA GPU from Ampere on); elsewhere bfloat16 is emulated, slower than float32, and `bf16_default`
keeps float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

PRECISIONS = ("auto", "float32", "bfloat16")
"""What `--precision` takes: bfloat16 where the hardware computes it natively (auto), or the type named."""


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether `device` computes bfloat16 matmuls natively (faster than float32, not emulated)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        cpu = torch.cpu
        return any(
            getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    return False


def bf16_default() -> bool:
    """bfloat16 where the device a `Trainer` would pick (the first GPU, else the CPU) computes it natively."""
    return bf16_supported("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def autocast_to(bf16: bool, device: torch.device | str):
    """`torch.autocast` to bfloat16 on `device`'s type (and on the CPU, where a model left there, such as the cut
    beside a GPU run, computes as the others do) when `bf16`; else a context that changes nothing."""
    with contextlib.ExitStack() as stack:
        for kind in sorted({torch.device(device).type, "cpu"}) if bf16 else ():
            stack.enter_context(torch.autocast(kind, dtype=torch.bfloat16))
        yield


def compute_dtype(parameter: torch.Tensor) -> torch.dtype:
    """The type a model whose weights are like `parameter` computes its matmuls in here: the autocast type when
    autocast is on for the parameter's device (and the weights are float32), else the weights' own."""
    kind = parameter.device.type
    if parameter.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return parameter.dtype


def check_precision(precision: str | None) -> None:
    """A `ValueError` unless `precision` is one of `PRECISIONS` or None."""
    if precision not in (None, *PRECISIONS):
        raise ValueError(f"--precision takes {', '.join(PRECISIONS)} (or nothing: --bf16 decides), got {precision!r}.")


def with_precision(args: Any, precision: str | None) -> Any:
    """`args` (`TrainingArguments`) computing in `precision`, one of `PRECISIONS`; None leaves `bf16` as it is."""
    check_precision(precision)
    if precision is None:
        return args
    if precision == "float32" and (args.bf16 or args.fp16):
        raise ValueError("--precision float32 contradicts --bf16 / --fp16: give one of them.")
    if precision == "bfloat16" and args.fp16:
        raise ValueError("--precision bfloat16 contradicts --fp16: give one of them.")
    native = bf16_supported("cpu") if args.use_cpu else bf16_default()
    bf16 = precision == "bfloat16" or (precision == "auto" and native and not args.fp16) or args.bf16
    return args if bf16 == args.bf16 else dataclasses.replace(args, bf16=bf16)  # replace: Trainer's checks run again
