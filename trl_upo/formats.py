"""Prompt and completion formats, as TRL reads them: *standard* rows hold strings, *conversational* rows hold lists
of ``{"role", "content"}`` messages (the prompt ends with a user turn; a completion is an assistant turn).

The one home of these helpers: heads, scoring, the data builders, evaluation and the commands all read prompts and
completions through this module."""

from __future__ import annotations

import json
from typing import Any


class DataError(ValueError):
    """A problem with the user's data that the user can fix (a missing column, a label that is not boolean, a
    non-finite score): the ``trl-upo`` command reports it as ``error: <message>`` with exit code 2, without a
    traceback. A ``ValueError``, so code that catches ValueError keeps working."""


def is_conversational(value: Any) -> bool:
    """Whether ``value`` is a list of chat messages (dicts with ``role`` and ``content``)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def check_prompt_column(dataset: Any, column: str) -> bool:
    """Check that ``dataset`` has the prompt column and that every prompt has one format.

    Args:
        dataset: a ``datasets.Dataset``.
        column: name of the prompt column.

    Returns:
        True for conversational prompts (message lists), False for standard prompts (strings).

    Raises:
        ValueError: no such column, an empty dataset, an empty or mistyped prompt, or mixed formats.
    """
    if column not in dataset.column_names:
        import difflib

        close = difflib.get_close_matches(column, dataset.column_names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"The dataset has no prompt column {column!r}.{hint} Columns: {dataset.column_names}. Pass the column "
            f"holding the prompts as prompt_column (--prompt_column)."
        )
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there are no prompts to build pairs from.")
    kinds = set()
    for i, prompt in enumerate(dataset[column]):
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"Row {i}: the prompt is empty. Remove the row or fill in its prompt.")
            kinds.add("standard")
        elif is_conversational(prompt):
            kinds.add("conversational")
        else:
            raise ValueError(
                f"Row {i}: the prompt must be a string (standard format) or a list of {{'role', 'content'}} messages "
                f"(conversational format), got {prompt!r}."
            )
    if len(kinds) > 1:
        raise ValueError(
            f"The prompt column {column!r} mixes strings and message lists; use one format for the whole dataset."
        )
    return kinds == {"conversational"}


def as_completion(text: str, conversational: bool) -> Any:
    """A generated text in the dataset's format: the string itself, or ``[{"role": "assistant", "content": text}]``."""
    return [{"role": "assistant", "content": text}] if conversational else text


def prompt_text(prompt: Any) -> str:
    """Plain text of a prompt, for a template: a string as is; one message as its content; several messages as
    ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return str(prompt[0]["content"])
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def completion_text(completion: Any) -> str:
    """Plain text of a completion (or of any message list): a string as is, one message as its content, several as
    their contents joined by newlines."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return "\n".join(completion_text(m) for m in completion)
    raise TypeError(f"Cannot read text from a completion of type {type(completion).__name__}")


def mapping_list(value: Any, what: str, example: str, singles: tuple[type, ...] = (dict,)) -> list | None:
    """A setting that takes a list of mappings, in the forms users give it: a list (YAML, Python), one mapping (or an
    instance of ``singles``) for a list of one, or a JSON string of either (the command line; blank means none).

    Args:
        value: what the user gave; None stays None (the caller's default applies).
        what: the setting's name, for the message.
        example: a JSON example of the setting, for the message.
        singles: types that stand for one item.

    Returns:
        The items as a list, or None.

    Raises:
        ValueError: a string that is not JSON, or a value that is not a list.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{what} must be a list of mappings, or a JSON string of one (on the command line), e.g. {example}; "
                f"could not parse {value!r}: {e}"
            ) from None
    if isinstance(value, singles):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list of mappings, got {type(value).__name__}.")
    return list(value)


def loads_json(text: str, where: str, fix: str) -> Any:
    """``json.loads(text)``; invalid JSON raises a ``ValueError`` that names ``where`` (a file), the position and
    ``fix``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        position = f"{e.msg} at line {e.lineno}, column {e.colno}; {len(text)} bytes"
        raise ValueError(f"{where} is not valid JSON ({position}): {fix}") from None
