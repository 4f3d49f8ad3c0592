"""Chat conversations as token ids: prompts rendered through a model's chat template, the tokens that end a turn,
and training examples whose labels keep the assistant's turns only.

Messages follow TRL's conventions: a list of `{"role": ..., "content": ...}` dicts (`system`, `user`,
`assistant`). A prompt is a user message as a string, or a list of messages ending with a user turn. Conversations
in ShareGPT's shape (`{"from": ..., "value": ...}` messages, speakers `human`, `gpt`, `system`, in a `messages` or
`conversations` column) are converted to TRL's wherever hf_recover reads them (`as_conversation`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .constants import IGNORE_INDEX

Messages = list[dict[str, str]]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_chat_template(tokenizer: Any, what: str) -> None:
    """Refuse chat data for a tokenizer without a chat template, saying what to do instead."""
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"{what} needs a chat template, and this tokenizer has none (a base model). Use plain text instead: "
            "unconditional samples (kind='samples') or prompts without chat formatting (chat=False)."
        )


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
"""ShareGPT's speakers (`from`) and the TRL roles they become."""
CONVERSATION_COLUMNS = ("messages", "conversations")
"""The columns a dataset of conversations holds them in: TRL's name, then ShareGPT's."""


def as_conversation(messages: Sequence[Mapping[str, Any]]) -> Messages:
    """Messages as `{"role": ..., "content": ...}` dicts, each checked: ShareGPT's `{"from": ..., "value": ...}`
    messages are converted (`SHAREGPT_ROLES`); any other shape is an error that names the message and the fix."""
    if isinstance(messages, str | Mapping) or not isinstance(messages, Sequence):
        raise TypeError(f"A conversation is a list of message dicts, got {type(messages).__name__} {messages!r}.")
    converted = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(
                f"Message {i} of a conversation is {type(message).__name__} {message!r}, not a dict: write each "
                "message as {'role': ..., 'content': ...}."
            )
        # keys another row of an Arrow column has are None here: only the keys this message fills count
        message = {key: value for key, value in message.items() if value is not None}
        if "from" in message and "role" not in message:
            speaker = message.pop("from")
            if speaker not in SHAREGPT_ROLES:
                raise ValueError(
                    f"Message {i} is in ShareGPT's shape with speaker {speaker!r}; hf_recover converts the speakers "
                    f"{list(SHAREGPT_ROLES)}. Write it as {{'role': ..., 'content': ...}} instead."
                )
            message = {"role": SHAREGPT_ROLES[speaker], "content": message.pop("value", None), **message}
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            hint = " Rename its 'text' key to 'content'." if "text" in message and "content" not in message else ""
            raise ValueError(
                f"Message {i} {message!r} needs a 'role' and a text 'content' (TRL's format; ShareGPT's 'from' / "
                f"'value' is converted).{hint}"
            )
        converted.append(message)
    return converted


def as_messages(prompt: str | Sequence[Mapping[str, str]]) -> Messages:
    """A prompt as messages: a string is one user turn; messages are checked (`as_conversation`) to end with a user
    turn, and no user turn may be blank."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("A prompt is empty: give each prompt some text.")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Mapping):
        raise TypeError(f"A prompt is a string or a list of messages, got one message {prompt!r}: wrap it in a list.")
    messages = as_conversation(prompt)
    if not messages:
        raise ValueError("A prompt's message list is empty: give it at least a user turn.")
    if messages[-1]["role"] != "user":
        raise ValueError(f"A prompt's last message must be the user's, got {messages[-1]['role']!r}.")
    for message in messages:
        if message["role"] == "user" and not message["content"].strip():
            raise ValueError(f"A prompt's user turn is blank ({message['content']!r}): give each user turn some text.")
    return messages


def prompt_list(prompts: Any) -> list[Any]:
    """`prompts` as a list, refusing the shapes that would silently be read as something else: one string (a
    prompt per character) and one conversation (a prompt per message)."""
    if isinstance(prompts, str):
        raise TypeError(
            f"prompts is one string ({prompts[:60]!r}), not a list of prompts: it would be read one character at a "
            f"time. Pass a list: [{prompts[:60]!r}]."
        )
    if isinstance(prompts, Mapping) or hasattr(prompts, "column_names") or not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a list of prompts (strings or message lists), got {type(prompts).__name__}.")
    values = list(prompts)
    if values and all(isinstance(value, Mapping) for value in values):
        raise TypeError(
            f"prompts is one conversation (a list of message dicts, the first {values[0]!r}), not a list of prompts: "
            "pass [conversation] to ask it as one prompt."
        )
    return values


def check_prompts(prompts: Any, tokenizer: Any = None) -> list[str | Messages]:
    """A user's prompts, checked before any generation: a list (`prompt_list`) of strings, kept as they are, and
    message lists, returned as `{"role", "content"}` dicts (`as_messages`). With `tokenizer`, a prompt holding one
    of its special tokens is refused, as synthesised prompts are: the chat template writes those itself."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    checked = []
    for i, prompt in enumerate(prompt_list(prompts)):
        try:
            messages = as_messages(prompt)
        except (TypeError, ValueError) as err:
            raise type(err)(f"Prompt {i}: {err}") from None
        for message in messages if special else []:
            ids = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
            found = sorted({tokenizer.convert_ids_to_tokens(token) for token in ids if token in special})
            if found:
                raise ValueError(
                    f"Prompt {i} holds the tokenizer's special token(s) {found} in {message['content']!r}: the chat "
                    "template writes those itself. Give the words only."
                )
        checked.append(prompt if isinstance(prompt, str) else messages)
    return checked


def render_prompt(tokenizer: Any, prompt: str | Sequence[Mapping[str, str]], *, chat: bool = True) -> list[int]:
    """The token ids that ask the model for an answer: the chat template up to the assistant's turn (`chat`), or
    the prompt's plain text (a base model)."""
    if chat:
        return list(tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, return_dict=False))
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in as_messages(prompt))
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def pad_id(tokenizer: Any) -> int:
    """The token batches of prompts are padded with: the tokenizer's pad token, else its end-of-sequence token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token to pad batches with.")
    return pad


def end_of_turn_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a turn, as the model and its tokenizer declare them: the generation config's
    `eos_token_id` (an int or a list) and the tokenizer's `eos_token_id`."""
    ids: list[int] = []
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (declared, getattr(tokenizer, "eos_token_id", None)):
        for token in value if isinstance(value, Iterable) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    if not ids:
        raise ValueError("Neither the model's generation config nor the tokenizer declares an end-of-turn token.")
    return ids


def chat_example(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> dict[str, list[int]]:
    """`input_ids` of a whole conversation and `labels` that keep only the assistant's turns (their content and the
    token that ends each of them); the system and user tokens, and the template's assistant header, are `-100`.

    The assistant's tokens are found by rendering the conversation up to each assistant turn with and without it, so
    the chat template must render a conversation's beginning the same way whatever follows (every ChatML-style
    template does).
    """
    messages = as_conversation(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("A chat example needs at least one assistant turn to train on.")
    full = list(tokenizer.apply_chat_template(messages, return_dict=False))
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, return_dict=False))
        through = tokenizer.apply_chat_template(messages[: i + 1], return_dict=False)
        if list(through[:start]) != full[:start] or list(through) != full[: len(through)]:
            raise ValueError(
                "The chat template renders a conversation's beginning differently depending on what follows: the "
                "assistant's tokens cannot be told apart from the prompt's."
            )
        end = _turn_end(tokenizer, through, start)
        labels[start:end] = full[start:end]
    return {"input_ids": full, "labels": labels}


def _turn_end(tokenizer: Any, through: Sequence[int], start: int) -> int:
    """Where an assistant turn's trained tokens end: after its end-of-turn token, before any separator the template
    writes after it (a newline is not the model's to predict as part of the answer)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = list(through)
    for position in range(len(ids) - 1, start - 1, -1):
        if ids[position] == eos:
            return position + 1
    return len(ids)


def repeated_ngram_rate(answers: Iterable[Sequence[int]], n: int = 4) -> float:
    """The share of n-grams that repeat an n-gram seen earlier in the same answer, over all answers' n-grams: 0 for
    answers that never repeat themselves, near 1 for an answer stuck in a loop."""
    repeated = total = 0
    for answer in answers:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(answer) - n + 1):
            gram = tuple(answer[i : i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else 0.0


CHAT_COLUMNS = ("input_ids", "attention_mask", "labels", "prompt_length")
"""The columns of a prepared chat dataset: a prose row has the first three and `prompt_length` 0."""


def prepare_chat_dataset(dataset: Any, tokenizer: Any, *, max_length: int = 512, num_proc: int | None = None):
    """Training rows from conversations: `input_ids`, `attention_mask`, `labels` (the assistant's tokens only: the
    system and user turns are `-100`, for the cross-entropy and the distillation terms alike) and `prompt_length`
    (the tokens before the first trained one, which on-policy distillation keeps as the prompt).

    `dataset` holds a `messages` column (TRL's conversational format; ShareGPT's `conversations` is converted), or
    is teacher data (`hf_recover.build_teacher_data`), whose exact token ids are used as they are. Rows longer than
    `max_length` are cut there; rows with no assistant token left are dropped. One conversation per row, unpacked:
    batch them with a padding collator (`transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)`).
    """
    columns = dataset.column_names
    exact = {"input_ids", "labels"} <= set(columns)
    column = next((name for name in CONVERSATION_COLUMNS if name in columns), None)
    if not exact:
        if column is None:
            raise ValueError(f"A chat dataset needs a 'messages' column (TRL's format); its columns are {columns}.")
        check_chat_template(tokenizer, "Chat training data")
        if len(dataset):  # a shape error in the data is said here, not from inside `datasets.map`
            chat_example(tokenizer, dataset[0][column])
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}.")

    def tokenize(row):
        example = (
            {"input_ids": row["input_ids"], "labels": row["labels"]} if exact else chat_example(tokenizer, row[column])
        )
        ids, labels = list(example["input_ids"])[:max_length], list(example["labels"])[:max_length]
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        return {
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "labels": labels,
            "prompt_length": trained[0] if trained else len(ids),
            "keep": len(trained) > 1 or (len(trained) == 1 and trained[0] > 0),
        }

    prepared = dataset.map(tokenize, remove_columns=columns, num_proc=num_proc, desc="Chat examples")
    prepared = prepared.filter(lambda keep: keep, input_columns="keep").remove_columns("keep")
    if len(prepared) == 0:
        raise ValueError("No conversation has an assistant token within max_length: nothing to train on.")
    return prepared
