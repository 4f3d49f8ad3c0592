"""Completions of many prompts at once with `model.generate` (batched, left-padded, with the KV cache), greedy or
sampled, cut after the first end-of-turn token. The teacher data, on-policy distillation and the chat evaluation all
generate through `generate_completions`; on a GPU fleet this is the seam where a vLLM engine would take over."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria

from .anatomy import accepts


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn: greedy (`temperature = 0`), or sampled at `temperature` with nucleus `top_p`."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        tokens = self.max_new_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generation_config(self, stop_ids: Sequence[int], pad_id: int):
        from transformers import GenerationConfig

        sampled = {} if self.greedy else {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
        return GenerationConfig(
            do_sample=not self.greedy, max_new_tokens=self.max_new_tokens, eos_token_id=list(stop_ids),
            pad_token_id=pad_id, use_cache=True, **sampled,
        )  # fmt: skip


class LoopStop(StoppingCriteria):
    """A `transformers` stopping criterion that ends a row stuck in a loop: once its last `window` new tokens repeat
    more than `max_rate` of their 4-grams, the row stops where it is, unfinished (its answer would be dropped
    anyway: a loop rarely ends). Rows that already ended their turn are left alone. `stopped_at[r]` is the number of
    new tokens row `r` had when it was stopped (-1: not stopped)."""

    def __init__(self, prompt_width: int, stop_ids: Sequence[int], *, window: int = 64, max_rate: float = 0.5, n=4):
        self.prompt_width, self.window, self.max_rate, self.n = prompt_width, window, max_rate, n
        self.stop_ids = torch.as_tensor(list(stop_ids))
        self.stopped_at: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_width :]  # (B, T) tokens generated so far
        if self.stopped_at is None:
            self.stopped_at = torch.full((len(input_ids),), -1, dtype=torch.long)
        looping = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        if new.shape[1] < self.window:
            return looping
        grams = new[:, -self.window :].unfold(1, self.n, 1).long()  # (B, W - n + 1, n)
        keys = torch.zeros(grams.shape[:2], dtype=torch.long, device=grams.device)
        for k in range(self.n):  # one integer per n-gram: a polynomial hash (int64 wraps; collisions are negligible)
            keys = keys * 1_000_003 + grams[..., k]
        ordered = keys.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).sum(1)  # n-grams equal to another one: repeats of earlier ones
        ended = torch.isin(new, self.stop_ids.to(new.device)).any(1)
        looping = (repeated.float() / keys.shape[1] > self.max_rate) & ~ended
        fresh = looping.cpu() & (self.stopped_at < 0)
        self.stopped_at[fresh] = new.shape[1]
        return looping


@torch.inference_mode()
def generate_completions(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    sampling: Sampling = Sampling(),
    batch_size: int = 16,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    stop_loops: bool = False,
) -> list[list[int]]:
    """The completion of every prompt (token ids after it, up to and including the first of `stop_ids`; a completion
    that reached `max_new_tokens` first has no stop token).

    Prompts of similar lengths share a batch (less padding). Sampled completions are reproducible with `seed`, which
    seeds each batch from its position in the length order: the same prompts and seed give the same completions
    whatever else runs in the process. `on_batch(n)` is called after each batch with its number of prompts. With
    `stop_loops`, a completion stuck in a loop is cut where `LoopStop` finds it, without a stop token: generating
    the rest of a loop is most of the cost of a small model's answers. The model's training mode is restored
    afterwards.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("A prompt has no tokens: nothing to continue from.")
    config = sampling.generation_config(stop_ids, pad_id)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding: every prompt ends where generation starts
                ids[r, width - len(prompts[i]) :] = torch.as_tensor(list(prompts[i]))
                mask[r, width - len(prompts[i]) :] = 1
            loops = LoopStop(width, stop_ids) if stop_loops else None
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
                if seed is not None:
                    torch.manual_seed(seed + start)
                output = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                    stopping_criteria=[loops] if loops else None,
                )  # fmt: skip
            for r, i in enumerate(rows):
                stopped = -1 if loops is None or loops.stopped_at is None else int(loops.stopped_at[r])
                tokens = output[r, width:].tolist()
                # a loop cut short ends where it was cut, padded after (with a pad id that may be the stop token)
                completions[i] = tokens[:stopped] if stopped >= 0 else _cut_after_stop(tokens, stop_ids)
            if on_batch is not None:
                on_batch(len(rows))
    finally:
        model.train(was_training)
    return completions


def _cut_after_stop(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    stops = set(stop_ids)
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[: position + 1]
    return tokens


@dataclass
class GenerationClock:
    """New tokens written and the seconds spent writing them, summed over the calls it `timed`; `last` keeps the
    last call's prompts and completions, the rows `forward_tokens_per_second` reads to compare a forward with it."""

    new_tokens: int = 0
    seconds: float = 0.0
    last: tuple[list, list] = ((), ())

    def timed(self, prompts: Sequence, write: Callable[[], list[list[int]]]) -> list[list[int]]:
        """`write()`'s completions of `prompts`, counted and timed."""
        started = time.perf_counter()
        completions = write()
        self.seconds += time.perf_counter() - started
        self.new_tokens += sum(len(completion) for completion in completions)
        self.last = (list(prompts), completions)
        return completions

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@torch.inference_mode()
def forward_tokens_per_second(model, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16) -> float:
    """A teacher-forced forward's throughput over `sequences` (right-padded batches; the padding is not counted):
    what generation of the same tokens is measured against."""
    device = next(model.parameters()).device
    sequences = [list(sequence) for sequence in sequences if len(sequence)]
    # the logits of the last position only, where the forward can skip the others (as generation's steps do)
    last_only = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    started, tokens = time.perf_counter(), 0
    for start in range(0, len(sequences), batch_size):
        ids, mask = right_padded(sequences[start : start + batch_size], pad_id)
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **last_only)
        tokens += int(mask.sum())
    seconds = time.perf_counter() - started
    return tokens / seconds if seconds > 0 else 0.0


def right_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, width)` ids of `sequences` padded on the right with `pad_id`, and their attention mask (teacher-forced
    batches; generation pads on the left)."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.as_tensor(list(sequence))
        mask[row, : len(sequence)] = 1
    return ids, mask
