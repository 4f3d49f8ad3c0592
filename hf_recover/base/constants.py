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

ANSWER_TOKENS = 128
ANSWER_TEMPERATURE = 0.0
ANSWER_TOP_P = 1.0
ANSWERS_PER_PROMPT = 1
NUM_PROMPTS = 256
"""How the recovery mixture's teacher data is written by default (`--teacher_data auto`): greedy answers up to 128
tokens, one to each of 256 prompts the teacher writes itself; the recipe that was measured. Sampled answers
(`--answer_temperature 0.7`; no nucleus: sorting the vocabulary at each step costs a quarter of the generation's speed
on CPU), several per prompt (`--answers_per_prompt`) and the answer filter (`--filter_answers`) are options: on the
teacher's own prompts 29% of its greedy answers finish within 128 tokens and 27-54% of sampled ones within 256-384, so
the filter keeps too few of them for the mixture's share (docs/recovery.md)."""
