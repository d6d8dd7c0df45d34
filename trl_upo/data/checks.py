"""Checks of a training split that need no scores, run before any scoring (and before TRL tokenizes the split):
what would otherwise end as a library error far from its cause.

- :func:`check_split`: a ``null`` prompt or response (names the row and column); conversational rows with a
  tokenizer that has no chat template (names the fixes); every prompt filling ``max_length`` so that TRL's
  preparation leaves no row to train on (names ``max_length``, the row count, the shortest prompt and the fixes).
- :func:`check_prepared_rows`: the same outcome measured after TRL's preparation (its filter is the authority): no
  row left is an error, rows dropped are a warning with their count.
"""

from __future__ import annotations

import logging
from typing import Any

from ..formats import DataError, is_conversational

logger = logging.getLogger(__name__)

#: The columns of TRL's preference and unpaired formats that may not hold ``null`` (a missing KTO ``label`` is the
#: KTO adapter's own check, :func:`trl_upo.data.unpaired.unpaired_dataset`).
FORMAT_COLUMNS = ("prompt", "chosen", "rejected", "completion")
#: The response columns of those formats (what follows the prompt).
RESPONSE_COLUMNS = ("chosen", "rejected", "completion")
#: Rows tokenized per batch when looking for one prompt that fits: the first batch nearly always holds one.
_BATCH = 64


def check_splits(train_dataset: Any, eval_dataset: Any, tokenizer: Any, args: Any) -> None:
    """:func:`check_split` on the train split and every eval split (one, or a dict of them), with the config's
    ``max_length`` and ``truncation_mode`` (a config without them, or with a ``max_prompt_length`` of older TRL
    releases: no length check)."""
    evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
    # A TRL whose config cuts prompts to their own `max_prompt_length` first never drops a row for its prompt.
    max_length = None if getattr(args, "max_prompt_length", None) is not None else getattr(args, "max_length", None)
    for split, dataset in [("train", train_dataset), *evals]:
        check_split(dataset, split, tokenizer=tokenizer, max_length=max_length,
                    truncation_mode=getattr(args, "truncation_mode", "keep_start"))


def check_split(dataset: Any, split: str, *, tokenizer: Any = None, max_length: int | None = None,
                truncation_mode: str = "keep_start") -> None:
    """Check a split before scoring. A stream (``IterableDataset``) or anything but a ``datasets.Dataset`` is left
    to TRL (its rows are not all known in advance).

    Args:
        dataset: the split, in TRL's preference (``prompt``, ``chosen``, ``rejected``) or unpaired (``prompt``,
            ``completion``, ``label``) format.
        split: its name, for the messages (``"train"``, ``"eval"``).
        tokenizer: the tokenizer TRL will tokenize with (a processor's tokenizer); ``None`` skips the tokenizer checks.
        max_length: the config's ``max_length`` (``None``: no truncation, nothing to check).
        truncation_mode: the config's ``truncation_mode``: only ``"keep_start"`` drops the rows whose prompt fills
            ``max_length`` (``"keep_end"`` keeps the end of the completion).

    Raises:
        DataError: a ``null`` value, a missing chat template, or no row whose prompt leaves room for a response.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or len(dataset) == 0:
        return
    check_no_nulls(dataset, split)
    if tokenizer is None:
        return
    conversational = is_conversational(dataset[0]["prompt"]) if "prompt" in dataset.column_names else False
    if conversational and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"The {split} dataset is conversational (its prompts are message lists) but the tokenizer "
            f"({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '') or 'unnamed'}) has no chat template "
            f"to render them. Train with a model whose tokenizer has one (an instruct/chat model), set one before "
            f"training (`tokenizer.chat_template = open('template.jinja').read()`, then pass that tokenizer as "
            f"`processing_class`), or convert the data to the standard format (string prompts and responses)."
        )
    if max_length is not None and truncation_mode == "keep_start" and "prompt" in dataset.column_names:
        check_prompt_room(dataset, split, tokenizer, max_length, conversational)


def check_no_nulls(dataset: Any, split: str) -> None:
    """A ``null`` in a prompt or response column is an error naming the first such row and its column."""
    import pyarrow.compute as pc

    for column in [c for c in FORMAT_COLUMNS if c in dataset.column_names]:
        if dataset.data.column(column).null_count == 0:
            continue  # the fast path: no null in the table (a selection of it has none either)
        values = dataset.with_format("arrow")[column]
        nulls = pc.indices_nonzero(pc.is_null(values)).to_pylist()
        if nulls:
            more = f" (and {len(nulls) - 1} more rows)" if len(nulls) > 1 else ""
            raise DataError(
                f"Row {nulls[0]} of the {split} dataset has no {column!r} (null){more}. Fill it in or drop the row "
                f"before training (e.g. `dataset.filter(lambda row: row[{column!r}] is not None)`)."
            )


def _ids(tokenizer: Any, value: Any, conversational: bool, generation_prompt: bool = False) -> list[int]:
    """Token ids of a prompt (or prompt + response), rendered as TRL renders it: the chat template for messages."""
    if conversational:
        out = tokenizer.apply_chat_template(list(value), tokenize=True, add_generation_prompt=generation_prompt)
        out = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return list(out[0]) if out and isinstance(out[0], list) else list(out)
    return list(tokenizer(value)["input_ids"])


def _prompt_tokens(tokenizer: Any, row: dict, conversational: bool) -> int:
    """The prompt's length in the training sequence, as TRL measures it: where the tokenized prompt and the tokenized
    prompt + response stop agreeing (at most the prompt's own length), the shortest over the row's responses."""
    prompt = _ids(tokenizer, row["prompt"], conversational, generation_prompt=True)
    length = len(prompt)
    for role in [r for r in RESPONSE_COLUMNS if r in row]:
        joined = _ids(tokenizer, (list(row["prompt"]) + list(row[role])) if conversational else
                      row["prompt"] + row[role], conversational)
        common = next((i for i, (a, b) in enumerate(zip(prompt, joined)) if a != b), min(len(prompt), len(joined)))
        length = min(length, common)
    return length


def check_prompt_room(dataset: Any, split: str, tokenizer: Any, max_length: int, conversational: bool) -> None:
    """An error when every prompt fills ``max_length``: TRL (``truncation_mode="keep_start"``) drops such rows, and
    with none left training ends in torch's ``num_samples=0`` (DPO) or runs no step at all (KTO).

    Cheap in the usual case: prompts are tokenized a batch at a time until one is shorter than ``max_length`` (its
    row certainly survives: TRL's prompt is never longer than the prompt tokenized alone). Only when none is, each
    row is measured as TRL measures it, to be sure."""
    n = len(dataset)
    for start in range(0, n, _BATCH):
        rows = dataset.select(range(start, min(n, start + _BATCH)))
        if any(len(_ids(tokenizer, p, conversational, True)) < max_length for p in rows["prompt"]):
            return
    lengths = [_prompt_tokens(tokenizer, row, conversational) for row in dataset]
    shortest = min(lengths)
    if shortest < max_length:
        return
    raise DataError(
        f"Every prompt of the {split} dataset ({n} rows) is at least max_length={max_length} tokens long (the "
        f"shortest: {shortest} tokens), so TRL's truncation (truncation_mode='keep_start') leaves no response token "
        f"and drops all {n} rows: nothing would be trained on. Raise max_length (--max_length) above the prompt "
        f"lengths plus room for the responses (e.g. {shortest + 64}), shorten the prompts, or set "
        f"truncation_mode='keep_end' to keep the responses and cut the prompts' start."
    )


def check_prepared_rows(dataset: Any, rows_before: int | None, split: str, max_length: int | None) -> None:
    """After TRL's preparation of a split: an error when it left no row of the ``rows_before`` it got (TRL drops the
    rows whose prompt fills ``max_length``), a warning naming the count when it dropped some."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or not rows_before:
        return
    left = len(dataset)
    if left == 0:
        raise DataError(
            f"TRL's preparation of the {split} dataset left none of its {rows_before} rows: every prompt fills "
            f"max_length={max_length} tokens, so no response token is left. Raise max_length (--max_length), "
            f"shorten the prompts, or set truncation_mode='keep_end'."
        )
    if left < rows_before:
        logger.warning("TRL dropped %d of the %d rows of the %s dataset: their prompt fills max_length=%s tokens, "
                       "leaving no response token. Raise max_length to train on them.", rows_before - left,
                       rows_before, split, max_length)
