"""Updating a README that is already there with hf_recover's model card, without losing what its author wrote.

hf_recover's part of the body sits between two markers and is replaced on each save; text outside them stays. The
metadata header is merged: lists of names (tags, datasets) are unioned, the author's other keys stay.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

logger = logging.getLogger(__name__)

BEGIN_MARKER = "<!-- hf_recover:begin -->"
END_MARKER = "<!-- hf_recover:end -->"


def merge_into_existing(path: Path, ours: ModelCard) -> ModelCard | None:
    text = path.read_text(encoding="utf-8")
    try:
        theirs = ModelCard(text, ignore_metadata_errors=True)
    except (ValueError, yaml.YAMLError) as err:  # a malformed header: merging would lose something
        logger.warning("Not updating %s: its metadata header cannot be read (%s). Fix it to get the card.", path, err)
        return None
    body = theirs.text
    begins, ends = body.count(BEGIN_MARKER), body.count(END_MARKER)
    section = _our_section(ours.text)
    if begins == ends == 0:
        body = body.rstrip() + "\n\n" + section + "\n" if body.strip() else ours.text
    elif begins == ends == 1 and body.index(BEGIN_MARKER) < body.index(END_MARKER):
        start, end = body.index(BEGIN_MARKER), body.index(END_MARKER) + len(END_MARKER)
        body = body[:start] + section + body[end:]
    else:
        logger.warning(
            "Not updating %s: it has %d '%s' and %d '%s' markers; keep exactly one pair around the hf_recover "
            "section (or none) to get the card updated.",
            path,
            begins,
            BEGIN_MARKER,
            ends,
            END_MARKER,
        )
        return None
    data = merge_metadata(theirs.data.to_dict(), ours.data.to_dict())
    original_order = list(theirs.data.to_dict())
    card_data = ModelCardData(ignore_metadata_errors=True, **data)
    return ModelCard(f"---\n{card_data.to_yaml(original_order=original_order)}\n---\n{body}")


def _is_name_list(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(v, str) for v in value)
    return value is None or isinstance(value, str)


def _our_section(text: str) -> str:
    start, end = text.index(BEGIN_MARKER), text.index(END_MARKER) + len(END_MARKER)
    return text[start:end]


def merge_metadata(theirs: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Ours fills and extends; lists of names (tags, datasets) are unioned, theirs first; their other keys stay.
    Structured values (`model-index`) are replaced by ours."""
    merged = dict(theirs)
    for key, value in ours.items():
        old = merged.get(key)
        if (isinstance(value, list) or isinstance(old, list)) and _is_name_list(value) and _is_name_list(old):
            merged[key] = list(dict.fromkeys([*as_list(old), *as_list(value)]))
        else:
            merged[key] = value
    return merged


def as_list(value: Any) -> list[Any]:
    """A metadata value as a list: None is empty, a string is one name, None entries are dropped."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [v for v in value if v is not None]
