"""Pushing a recovered model to the Hugging Face Hub.

`push_recovered` validates a saved folder (its files, the repo id, and that `pruned_config.json` matches the
weights) and sends it in one commit, with the model card rendered in memory when the folder has none. The
trainer's `push_to_hub` calls it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from fnmatch import fnmatch
from pathlib import Path

from ..base.constants import PRUNED_CONFIG_NAME
from ..base.loading import MODEL_WEIGHT_PATTERNS, check_pruned_config_matches_weights
from .card import CARD_NAME, generate_model_card, saved_pruned_config

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload model recovered with hf_recover"

# What a push sends: top-level files only (checkpoint-*/ and other subfolders never go), by name.
WEIGHT_PATTERNS = (*MODEL_WEIGHT_PATTERNS, "adapter_model.safetensors")
PUSH_PATTERNS = (
    *WEIGHT_PATTERNS,
    "model.safetensors.index.json",
    "config.json",
    "adapter_config.json",
    "generation_config.json",
    PRUNED_CONFIG_NAME,
    CARD_NAME,
    "projectors.safetensors",  # only there when the user asked to export them (`save_projectors`)
    # tokenizer files, as `PreTrainedTokenizer(Fast).save_pretrained` writes them
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class HubPushError(RuntimeError):
    """A push to the Hub failed (network, authentication or permission); the local folder is intact."""


def push_recovered(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
):
    """Push a saved recovered model to the Hub repo `repo_id` in one commit; return its `CommitInfo`.

    Sends only the top-level files a user needs: the safetensors weights (or a PEFT adapter), `config.json`,
    `generation_config.json`, the tokenizer files, `pruned_config.json` and `README.md` (rendered in memory
    from `pruned_config.json` when the folder has none). Checkpoint
    subfolders, optimizer and scheduler states, `training_args.bin` and other training leftovers stay
    local. Everything is validated before anything is sent: the folder and its weights exist, `repo_id` is
    a valid repo id, and `pruned_config.json` (when present) agrees with the weights and `config.json`.
    The repo is created if it does not exist (`private` applies then). The folder is only read.

    Raises:
        FileNotFoundError: the folder, its weights or its `config.json` are missing.
        ValueError: `repo_id` is invalid, or `pruned_config.json` does not match the model.
        HubPushError: the Hub could not be reached, refused the token, or the token may not write to
            `repo_id`. The local folder is unchanged: fix the cause and call again to retry.
    """
    folder = Path(folder)
    files = _files_to_push(folder)
    _validate_repo_id(repo_id)
    check_pruned_config_matches_weights(folder, files)

    from huggingface_hub import CommitOperationAdd, HfApi

    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    if CARD_NAME not in files:  # the card travels with the model even if none was saved; the folder is not touched
        card = generate_model_card(pruned_config=saved_pruned_config(folder), hub_model_id=repo_id)
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card).encode("utf-8")))
    message = commit_message or DEFAULT_COMMIT_MESSAGE
    names = [op.path_in_repo for op in operations]
    logger.info("Pushing %d files from %s to the Hub repo %s: %s", len(names), folder, repo_id, ", ".join(names))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=message, repo_type="model", revision=revision)
    except _network_errors() as err:
        raise HubPushError(_push_failure_message(err, folder, repo_id, token)) from err


def _files_to_push(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder. Give the folder a recovered model was saved to "
            "(trainer.save_model(output_dir) or model.save_pretrained(output_dir))."
        )
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    files = [name for name in names if any(fnmatch(name, pattern) for pattern in PUSH_PATTERNS)]
    if not any(fnmatch(name, pattern) for name in files for pattern in WEIGHT_PATTERNS):
        found = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".safetensors"))]
        hint = f" (found only {', '.join(found)})" if found else ""
        raise FileNotFoundError(
            f"{folder} holds no safetensors weights{hint}: expected model.safetensors, sharded "
            "model-0000x-of-0000y.safetensors or adapter_model.safetensors. Save the model with "
            "save_pretrained(output_dir) (safe_serialization=True, the default) before pushing."
        )
    is_adapter = "adapter_model.safetensors" in files
    needed = "adapter_config.json" if is_adapter else "config.json"
    if needed not in files:
        raise FileNotFoundError(
            f"{folder} has weights but no {needed}; save the model with save_pretrained(output_dir), "
            "which writes both."
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing = sorted(shards - set(files))
        if missing:
            raise FileNotFoundError(f"{index} lists weight shards that are not in the folder: {', '.join(missing)}.")
    return files


def _validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"Invalid Hub repo id {repo_id!r}: {err} Use 'your-username/model-name' (letters, digits, '-', '_', '.')."
        ) from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the push did not go through: HTTP status, connection, timeout, I/O."""
    errors: list[type[BaseException]] = [OSError]
    from huggingface_hub.errors import HfHubHTTPError

    errors.append(HfHubHTTPError)
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(__import__(module), name))
    return tuple(errors)


def _push_failure_message(err: BaseException, folder: Path, repo_id: str, token: str | None) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        cause = "the Hub rejected the token (HTTP 401): log in with `hf auth login` or pass a valid token"
    elif status == 403:
        cause = f"the token may not write to {repo_id} (HTTP 403): use a token with write access to that namespace"
    elif status == 404:
        cause = f"the repo or revision was not found (HTTP 404): check the namespace and branch of {repo_id}"
    elif status is not None:
        cause = f"the Hub answered HTTP {status}"
    else:
        cause = "the Hub could not be reached (network error)"
    detail = str(err)
    if token:
        detail = detail.replace(token, "***")
    return (
        f"Pushing {folder} to the Hub repo {repo_id!r} failed: {cause}. [{type(err).__name__}: {detail}] "
        "The local folder was not changed; fix the cause and push again to retry."
    )
