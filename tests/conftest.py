"""Offline fixtures: tiny models built from configs and a tokenizer trained on a few paragraphs."""

from __future__ import annotations

import os
import random

# Tests never reach the Hugging Face Hub: set before huggingface_hub / datasets read their settings.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_recover.base.constants import IGNORE_INDEX  # noqa: E402

TINY_TEXTS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the warm sun all afternoon.",
    "In the beginning was the word, and the word was written down in a small book of many pages.",
    "Pruning removes whole transformer blocks or the neurons of their feed-forward layers.",
    "Knowledge distillation teaches a small student to imitate the outputs of a larger teacher.",
    "A river runs through the valley; farmers plant wheat and barley along its fertile banks.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Perplexity is the exponential of the average negative log-likelihood per predicted token.",
    "To be, or not to be, that is the question: whether tis nobler in the mind to suffer.",
    "The kernel schedules tasks across processors and handles interrupts from many devices.",
]

# Every architecture that pruning supports, as tiny configs: (model_type, config class, extra kwargs).
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3_text", "mistral")


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    random.seed(0)
    torch.manual_seed(0)
    # Tiny models gain nothing from a second thread and lose much to its synchronisation on a busy
    # machine; the real-teacher tests (`slow`) use both cores.
    torch.set_num_threads(2 if request.node.get_closest_marker("slow") else 1)


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""A ChatML template with a default system prompt, as SmolLM2-Instruct's."""


def build_tiny_chat_tokenizer(texts: list[str] = TINY_TEXTS):
    """The tiny tokenizer with ChatML's turn tokens and template; its end-of-turn token `<|im_end|>` is its eos."""
    return build_tiny_tokenizer(texts, chat=True)


def build_tiny_tokenizer(texts: list[str] = TINY_TEXTS, *, chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>", *(["<|im_start|>", "<|im_end|>"] if chat else [])]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>" if chat else "</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"] if chat else None,
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def packed_blocks(tiny_tokenizer):
    """Two short texts packed into blocks of 16 tokens: evaluation or calibration data for the tiny models."""
    from datasets import Dataset

    from hf_recover.base.data import prepare_recovery_dataset

    texts = ["The quick brown fox jumps over the lazy dog. " * 8, "A river runs through the green valley. " * 8]
    return prepare_recovery_dataset(Dataset.from_dict({"text": texts}), tiny_tokenizer, max_length=16)


@pytest.fixture(scope="session")
def tiny_chat_tokenizer():
    return build_tiny_chat_tokenizer()


def tiny_config(model_type: str = "llama", *, vocab_size: int = 320, **overrides):
    """A tiny config of `model_type` (6 blocks, hidden 32, GLU MLP 64, 4 heads / 2 KV heads)."""
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    if model_type == "gemma3_text":
        # Mixed sliding/full attention: every third block is full, the others slide over 8 tokens.
        kwargs.update(head_dim=8, sliding_window=8, sliding_window_pattern=3)
    if model_type == "qwen3":
        kwargs.update(head_dim=8)
    if model_type == "mistral":
        kwargs.update(sliding_window=16)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_model(model_type: str = "llama", *, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="eager")
    return model.eval()


@pytest.fixture
def tiny_model_factory():
    """`tiny_model_factory("qwen3", num_hidden_layers=4)` builds a fresh tiny model."""
    return build_tiny_model


@pytest.fixture(params=ARCHITECTURES)
def tiny_model(request):
    """A tiny model of each supported architecture (the test runs once per architecture)."""
    return build_tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return build_tiny_model("llama")


def make_inputs(batch=3, seq=47, vocab=123, *, teacher_vocab=None, dtype=torch.float32, ignore=0.3, scale=3.0):
    """Random logits and labels; a fraction `ignore` of the labels (and a prompt-like prefix) is -100.

    Below half ignored, the losses walk the positions densely (contiguous chunks, masked); above, they gather
    the valid ones (`DENSITIES` exercises both)."""
    student = (scale * torch.randn(batch, seq, vocab)).to(dtype)
    teacher = (scale * torch.randn(batch, seq, teacher_vocab or vocab)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq))
    if ignore:
        labels[torch.rand(batch, seq) < ignore] = IGNORE_INDEX
        labels[0, :5] = IGNORE_INDEX  # a prompt-like prefix
    return student, teacher, labels


def make_args(tmp_path, name: str = "out", cls=None, **overrides):
    """A quiet, CPU-only, short `DistillationConfig` (or `cls`) writing to `tmp_path / name`; `overrides` win."""
    from hf_recover.distill.config import DistillationConfig

    kwargs = dict(
        output_dir=str(tmp_path / name),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return (cls or DistillationConfig)(**{**kwargs, **overrides})
