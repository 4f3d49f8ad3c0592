"""Names shared across hf_recover, defined once."""

IGNORE_INDEX = -100
"""Label value ignored by the losses and by perplexity (as in `torch.nn.CrossEntropyLoss`)."""

PRUNED_CONFIG_NAME = "pruned_config.json"
"""File written next to the weights of every pruned or recovered model."""

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3_text", "mistral")
"""`config.model_type` values hf_recover supports and tests: depth and width pruning, and the trainer's cross-entropy
fused with the KD pass (their causal-LM loss is transformers' plain shifted cross-entropy)."""

MLP_SIZES_FIELD = "hf_recover_intermediate_sizes"
"""Config field holding per-layer MLP sizes when they differ (transformers takes a single int)."""

ATTENTION_HEADS_FIELD = "hf_recover_attention_heads"
"""Config field holding per-layer query-head counts when they differ (transformers takes a single int)."""

CHAT_FRACTION = 0.3
"""Default share of a recovery mixture's tokens taken from the teacher's answers (the rest is text): the share that
measured best on prose and the assistant together (docs/recovery.md)."""

ANSWER_TOKENS = 256
"""Longest teacher answer written for recovery (`--answer_tokens`): a budget most of the teacher's answers finish
within (the share is reported in the teacher data's card)."""

ANSWER_TEMPERATURE = 0.7
ANSWER_TOP_P = 1.0
"""How the teacher's answers for recovery are sampled: greedy answers of a small model loop and never end; sampled
ones end more often and differ between a prompt's candidates. No nucleus (top-p 1.0): sorting the vocabulary at
every step costs a quarter of the generation's speed on CPU (97 against 125 new tokens/s, measured here)."""

ANSWERS_PER_PROMPT = 2
NUM_PROMPTS = 128
"""Prompts the teacher writes itself for recovery, and candidate answers it writes to each (256 answers, as many as
one answer to 256 prompts would be): the answer filter keeps those that finish, do not refuse and do not loop, and a
second answer gives a prompt whose first one loops another chance."""
