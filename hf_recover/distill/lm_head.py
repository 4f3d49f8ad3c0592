"""What a causal LM's output head computes, and when hf_recover may compute it itself.

Two fast paths of the trainer replace work a model would do in its forward:
- the **fused cross-entropy**: the student's CE is computed with the KD term in one pass over the logits, which is
  right only where the model's own loss is transformers' plain shifted causal-LM cross-entropy;
- the **fused lm_head**: both models run to their final hidden states (`logits_to_keep` selects no position, so
  their lm_heads produce nothing) and the loss applies each lm_head chunk by chunk (`LMHeadInputs`), which is right
  only where the logits are `final norm → linear lm_head (→ Gemma's soft-capping)`.

Both are decided by declared capability: the model types hf_recover tests (`SUPPORTED_ARCHITECTURES`), exact
transformers classes, and a plain `nn.Linear` head; everything else keeps the model's own path.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import torch
from torch import nn

from ..base.anatomy import accepts
from ..base.constants import SUPPORTED_ARCHITECTURES
from ..base.losses import LMHeadInputs


def is_peft_model(model) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed / PEFT wrappers."""
    model = getattr(model, "module", model)  # DDP, DeepSpeed
    return model.get_base_model() if is_peft_model(model) else model


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _declared_type_problem(model: nn.Module) -> str | None:
    config = text_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        return f"model type {model_type!r} is not one of the tested {', '.join(SUPPORTED_ARCHITECTURES)}"
    if not type(model).__module__.startswith("transformers."):
        return f"{type(model).__name__} is a subclass with a forward of its own"
    return None


def plain_loss_problem(model: nn.Module) -> str | None:
    """Why `model`'s own loss is not transformers' plain shifted causal-LM CE; None when it is."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = base_model(model)
    config = text_config(model)
    if problem := _declared_type_problem(model):
        return problem
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return "its loss function is not the plain causal-LM cross-entropy"
    if getattr(config, "output_router_logits", False):
        return "it adds a router auxiliary loss"
    if getattr(config, "z_loss_coefficient", 0):
        return "it adds a z-loss"
    return None


def fused_head_problem(model: nn.Module) -> str | None:
    """Why `model`'s logits cannot be computed chunk by chunk from its final hidden states; None when they can."""
    model = base_model(model)
    if problem := _declared_type_problem(model):
        return problem
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        # e.g. a PEFT adapter or modules_to_save wrapper on the lm_head: its output is more than weight @ hidden
        return f"its lm_head is {type(head).__name__}, not a plain nn.Linear"
    if not accepts(model, "logits_to_keep"):
        return "its forward takes no logits_to_keep"
    if final_norm(model) is None:
        return "its final norm is not model.model.norm"
    return None


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm whose output the lm_head reads (`model.model.norm` in every supported architecture)."""
    norm = getattr(getattr(base_model(model), "model", None), "norm", None)
    return norm if isinstance(norm, nn.Module) else None


@contextmanager
def first_output(module: nn.Module | None):
    """Capture `module`'s output (the first element of a tuple output) during a forward inside the block.

    Yields a list that holds the output once the forward ran; it stays empty when `module` is None. The first call
    wins: a gradient-checkpointing recomputation must not replace the output the graph was built on.
    """
    captured: list[torch.Tensor] = []
    if module is None:
        yield captured
        return

    def keep(module, args, output):
        if not captured:
            captured.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def final_hidden_states(model: nn.Module, enabled: bool):
    """Capture what `model`'s lm_head reads, its final norm's output (`first_output`), when `enabled`; and inside
    the block, let the lm_head skip a call that keeps no position (`no_logits`).

    The fused lm_head reads the hidden states this way rather than through `output_hidden_states`, which would keep
    every layer's hidden states alive until the loss is computed: for the teacher, `num_layers × tokens × hidden`
    of memory that nothing else needs. An lm_head given no position computes nothing, but under autocast
    `nn.Linear` still casts its whole `(vocab, hidden)` weight first; skipped, that copy is saved in every forward.
    """
    with first_output(final_norm(model) if enabled else None) as captured, _empty_calls_skipped(model, enabled):
        yield captured


@contextmanager
def _empty_calls_skipped(model: nn.Module, enabled: bool):
    """Inside the block, `model`'s lm_head answers an input with no position with empty logits, without running."""
    head = base_model(model).get_output_embeddings() if enabled else None
    if not isinstance(head, nn.Linear):
        yield
        return
    own = head.__dict__.get("forward")  # an instance forward of its own (accelerate's hooks set one): restored
    forward = head.forward

    def skip_empty(hidden, *args, **kwargs):
        if hidden.numel() == 0:
            return hidden.new_empty(*hidden.shape[:-1], head.out_features)
        return forward(hidden, *args, **kwargs)

    head.forward = skip_empty
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def no_logits(device: torch.device) -> torch.Tensor:
    """`logits_to_keep` that keeps no position: the model's lm_head then computes nothing."""
    return torch.empty(0, dtype=torch.long, device=device)


def loss_side(model: nn.Module, final: list[torch.Tensor], outputs) -> LMHeadInputs | torch.Tensor:
    """What the loss reads of a model's output: what makes its logits when `final_hidden_states` captured them (the
    fused lm_head), else the logits themselves."""
    return head_inputs(model, final[0]) if final else outputs.logits


def head_inputs(model: nn.Module, final_hidden_states: torch.Tensor) -> LMHeadInputs:
    """What `model`'s logits are made of: its final (normed) hidden states, lm_head and soft-capping."""
    model = base_model(model)
    head = model.get_output_embeddings()
    return LMHeadInputs(final_hidden_states, head.weight, head.bias, _softcap(model))


def head_logits(model: nn.Module, final_hidden_states: torch.Tensor) -> torch.Tensor:
    """The logits `model`'s own forward computes from its final (normed) hidden states: its lm_head module (an
    adapter on it included), then Gemma's soft-capping. `(B, T, H) -> (B, T, V)`, with its gradient."""
    model = base_model(model)
    head = model.get_output_embeddings()
    logits = head(final_hidden_states.to(head.weight.device))
    softcap = _softcap(model)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _softcap(model: nn.Module) -> float | None:
    """Gemma's `final_logit_softcapping` (None for the models that have none)."""
    return getattr(text_config(model), "final_logit_softcapping", None)
