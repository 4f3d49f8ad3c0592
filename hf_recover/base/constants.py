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

ANSWER_TOKENS = 384
ANSWER_TEMPERATURE = 0.7
ANSWER_TOP_P = 1.0
ANSWERS_PER_PROMPT = 2
NUM_PROMPTS = 256
KEPT_ANSWER_TOKENS = 256
"""How the recovery mixture's teacher data is written by default (`--teacher_data auto`): two answers sampled at
temperature 0.7 to each of 256 prompts the teacher writes itself, each up to 384 tokens, of which training reads those
that finish within 256 tokens, do not refuse and do not loop (`GOOD_ANSWERS`). A 135M teacher's greedy answers to its
own prompts finish within 128 tokens 29% of the time and refuse 20% of the time; sampled and given 384 tokens, half of
them finish; the filter keeps 23% of them, 22,244 tokens, enough for the mixture's share. A student trained on the
answers that finish within 384 tokens (207 tokens on average) writes answers too long to end within the budget it is
judged in (0.69x the teacher's finish rate on the `dev` prompts); within 256 (136 on average), 0.89x
(docs/recovery.md has the figures). No nucleus: sorting the vocabulary at each step costs a quarter of the
generation's speed on CPU."""
