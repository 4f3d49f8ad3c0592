"""Peak memory and time of hf_recover's chunked KD losses against a naive full-vocabulary float32 loss.

Forward + backward of forward KL and skew forward KL (λ = 0.1) on float32 logits, batch × seq_len tokens,
every token valid (the chunked path gains nothing from masked tokens here). With `--fused`, a third
comparison starts from the student's hidden states: lm_head then the chunked forward KL, against
`fused_linear_divergence`.

Each variant runs in a fresh subprocess. Its memory figure is the peak RSS (VmHWM, reset once the inputs
exist) minus the RSS at that moment: the extra memory the loss needs, gradients of the inputs included in
every variant. Time is the median of `--repeats` forward + backward passes after one warm-up pass.

Usage:
    python benchmarks/loss_memory.py                 # 4 × 1024 tokens, vocab 49152 (1-3 minutes)
    python benchmarks/loss_memory.py --large         # 4 × 2048 tokens, vocab 49152 (about 16 GB peak)
    python benchmarks/loss_memory.py --fused --batch 1  # adds lm_head + loss vs the fused variant (slow on CPU)
    python benchmarks/loss_memory.py --batch 2 --seq-len 512 --vocab 152064 --chunk-size 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import harness

LOSSES = ("forward_kl", "skew_forward_kl")
VARIANTS = ("naive", "chunked")
LM_HEAD_VARIANTS = ("lm_head+chunked", "fused")  # the fused variant starts from hidden states and lm_head
HIDDEN_SIZE = 576  # SmolLM2-135M
SKEW_LAMBDA = 0.1
TEMPERATURE = 2.0


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return it.

    Building the inputs passes through temporaries; without the reset their peak would hide the loss's.
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_bytes("VmRSS")


def naive_loss(name: str, student_logits, teacher_logits, labels):
    """What peers write: full-vocabulary float32 softmaxes over every position, then a mask."""
    import torch.nn.functional as F

    mask = (labels[:, 1:] != -100).float()  # (B, T-1)
    student_logp = F.log_softmax(student_logits[:, :-1].float() / TEMPERATURE, dim=-1)  # (B, T-1, V)
    teacher_logp = F.log_softmax(teacher_logits[:, :-1].float() / TEMPERATURE, dim=-1)
    if name == "forward_kl":
        per_token = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)
    else:  # DistiLLM's skew KL: KL(p ‖ λp + (1 − λ)q)
        teacher_probs, student_probs = teacher_logp.exp(), student_logp.exp()
        mixture_logp = (SKEW_LAMBDA * teacher_probs + (1 - SKEW_LAMBDA) * student_probs).log()
        per_token = (teacher_probs * (teacher_logp - mixture_logp)).sum(-1)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def chunked_loss(name: str, student_logits, teacher_logits, labels, chunk_size):
    from hf_recover.base.losses import DIVERGENCES

    params = {"skew_lambda": SKEW_LAMBDA} if name == "skew_forward_kl" else {}
    return DIVERGENCES[name](
        student_logits, teacher_logits, labels, temperature=TEMPERATURE, chunk_size=chunk_size, **params
    )


def worker(args) -> None:
    import torch
    import torch.nn.functional as F

    from hf_recover.base.losses import fused_linear_divergence

    torch.manual_seed(0)
    teacher = 3 * torch.randn(args.batch, args.seq_len, args.vocab)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    if args.variant in LM_HEAD_VARIANTS:
        hidden = torch.randn(args.batch, args.seq_len, HIDDEN_SIZE).requires_grad_()
        weight = (torch.randn(args.vocab, HIDDEN_SIZE) * 3 / HIDDEN_SIZE**0.5).requires_grad_()
    else:
        student = (3 * torch.randn(args.batch, args.seq_len, args.vocab)).requires_grad_()
    baseline = reset_peak_rss()

    def step():
        if args.variant == "fused":
            hidden.grad = weight.grad = None
            loss = fused_linear_divergence(
                hidden, weight, teacher, labels, temperature=TEMPERATURE, chunk_size=args.chunk_size
            )
        elif args.variant == "lm_head+chunked":
            hidden.grad = weight.grad = None
            loss = chunked_loss(args.loss, F.linear(hidden, weight), teacher, labels, args.chunk_size)
        else:
            student.grad = None
            if args.variant == "naive":
                loss = naive_loss(args.loss, student, teacher, labels)
            else:
                loss = chunked_loss(args.loss, student, teacher, labels, args.chunk_size)
        loss.backward()
        return loss.item()

    value = step()  # warm-up; it also reaches the peak
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _status_bytes("VmHWM")
    print(json.dumps({"extra_bytes": peak - baseline, "seconds": statistics.median(times), "value": value}))


def run_variant(args, loss: str, variant: str) -> dict:
    flags = {"--worker": True, "--loss": loss, "--variant": variant, "--batch": args.batch, "--seq-len": args.seq_len}
    return harness.run_variant(
        __file__, {**flags, "--vocab": args.vocab, "--repeats": args.repeats, "--chunk-size": args.chunk_size}
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--large", action="store_true", help="4 × 2048 tokens (overrides --batch/--seq-len)")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: automatic)")
    parser.add_argument("--repeats", type=int, default=2, help="timed forward + backward passes per variant")
    parser.add_argument(
        "--fused", action="store_true", help="also compare lm_head + chunked forward KL with the fused variant"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", choices=LOSSES, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS + LM_HEAD_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.large:
        args.batch, args.seq_len = 4, 2048
    if args.worker:
        worker(args)
        return

    tokens = args.batch * args.seq_len
    print(
        f"{args.batch} × {args.seq_len} tokens, vocab {args.vocab}, float32 logits, T = {TEMPERATURE}, "
        f"chunk size {args.chunk_size or 'auto'}; one logits tensor = {tokens * args.vocab * 4 / 2**20:.0f} MiB"
    )
    comparisons = [(loss, VARIANTS) for loss in LOSSES] + ([("forward_kl", LM_HEAD_VARIANTS)] if args.fused else [])
    for loss, variants in comparisons:
        if variants == LM_HEAD_VARIANTS:
            print(f"from hidden states (width {HIDDEN_SIZE}) through lm_head; the fused variant never stores logits:")
        results = {variant: run_variant(args, loss, variant) for variant in variants}
        baseline, candidate = (results[variant] for variant in variants)
        for variant, result in results.items():
            print(
                f"  {loss:16s} {variant:15s} extra peak {result['extra_bytes'] / 2**20:8.0f} MiB   "
                f"fwd+bwd {result['seconds']:6.2f} s   loss {result['value']:.6f}"
            )
        agree = abs(baseline["value"] - candidate["value"]) <= 1e-4 * max(abs(baseline["value"]), 1e-6)
        print(
            f"  {loss:16s} {variants[1]} vs {variants[0]}: memory ratio "
            f"{candidate['extra_bytes'] / baseline['extra_bytes']:.3f}   "
            f"time ratio {candidate['seconds'] / baseline['seconds']:.3f}   values agree: {agree}"
        )


if __name__ == "__main__":
    main()
