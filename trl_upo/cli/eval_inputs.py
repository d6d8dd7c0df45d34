"""The inputs of ``trl-upo eval``: the heads (``--reward_heads`` or a ``--config`` recipe), the rows of the split
(map-style, or the first ``--num_prompts`` rows of a stream with ``--dataset_streaming true``), and the prompts and
held-out preference data in them.

A streamed split is read only as far as the evaluation needs: its first ``--num_prompts`` rows, the same rows a
map-style evaluation of the same source uses (it takes the first ``--num_prompts`` rows too), so the two give the
same ``eval.json`` (but for ``dataset.streaming: true``). The rest of the stream is never downloaded or read;
``eval.json`` records how many rows were read and that they came from a stream (``dataset.rows``,
``dataset.streaming``).
"""

from __future__ import annotations

import json
from itertools import islice
from typing import Any

from trl_upo.cli.common import UsageError, did_you_mean, read_yaml

#: Keys of a ``--config`` YAML that ``trl-upo eval`` uses; the others (training settings) are listed and not used.
CONFIG_KEYS = ("reward_heads", "reward_funcs", "reward_weights", "beta")


def load_rows(source: str, split: str, *, config_name: str | None, num_prompts: int, streaming: bool,
              log=print) -> Any:
    """The rows to evaluate: the first ``num_prompts`` rows of the split, as a ``datasets.Dataset``.

    Args:
        source: The ``--dataset_name`` (resolved).
        split: The ``--dataset_test_split``.
        config_name: The ``--dataset_config``.
        num_prompts: How many rows to use (the evaluation generates for each of them).
        streaming: Read the split as a stream (``--dataset_streaming true``): only its first ``num_prompts`` rows
            are read (a Hub dataset is not downloaded whole), and one more to say whether the stream goes on
            (logged); with ``False`` the split is loaded and cut.
        log: Where the message about the rows read goes.

    Returns:
        The rows, with the split's features (a stream's, when it declares them).

    Raises:
        UsageError: a sliced split (``test[:100]``) with streaming (a stream cannot be sliced: use ``--num_prompts``),
            or an empty split.
        DatasetLoadError: an unreadable source or a missing split (:mod:`trl_upo.data.loading`).
    """
    from datasets import Dataset

    from trl_upo.data.loading import load_split, load_splits, select_split

    fix = "choose the split with --dataset_test_split"
    if not streaming:
        data = load_split(source, split, config_name=config_name, limit=num_prompts, fix=fix)
    else:
        if "[" in split:
            raise UsageError(f"--dataset_test_split {split!r} slices the split, which a stream cannot do: give the "
                             f"split's name and the number of rows with --num_prompts.")
        stream = select_split(load_splits(source, config_name=config_name, file_split=split, streaming=True), split,
                              source, fix)
        rows = list(islice(iter(stream), num_prompts + 1))
        if len(rows) > num_prompts:
            rows = rows[:num_prompts]
            log(f"Read the first {num_prompts} rows of the {split!r} stream (--num_prompts); it has more, not read.")
        data = Dataset.from_list(rows, features=stream.features) if rows else Dataset.from_dict({})
    if len(data) == 0:
        raise UsageError(f"the {split!r} split of {source!r} is empty.")
    return data




def read_heads(heads_json: str | None, config: str | None) -> tuple[list[dict], dict[str, Any], list[str]]:
    """Head specs from ``--heads`` or ``--config``.

    Args:
        heads_json: The ``--reward_heads`` JSON.
        config: The ``--config`` YAML file.

    Returns:
        ``(heads, the other config values used, the config keys not used)``.

    Raises:
        UsageError: both given, invalid JSON, an unreadable config, or a config without ``reward_heads``.
    """
    if heads_json and config:
        raise UsageError("give the heads either with --reward_heads (--heads) or in --config, not both.")
    if heads_json:
        try:
            heads = json.loads(heads_json)
        except json.JSONDecodeError as e:
            raise UsageError(f"--reward_heads is not valid JSON ({e}); e.g. --reward_heads "
                             f"'[{{\"name\": \"length\"}}]'.") from None
        return (heads if isinstance(heads, list) else [heads]), {}, []
    if not config:
        return [], {}, []
    from trl_upo.cli.rewards import reward_func_heads

    data = read_yaml(config, "--config")
    if "reward_heads" not in data and "reward_funcs" not in data:
        hint = did_you_mean("reward_heads", data, quote="'")
        raise UsageError(f"--config {config!r} has no reward_heads or reward_funcs{hint}.")
    heads = data.get("reward_heads") or []
    if isinstance(heads, str):
        try:
            heads = json.loads(heads)
        except json.JSONDecodeError as e:
            raise UsageError(f"--config {config!r}: reward_heads is a string that is not valid JSON ({e}).") from None
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads]
    taken = [str(h.get("name") or h.get("type")) for h in heads if isinstance(h, dict)]
    heads += reward_func_heads(data.get("reward_funcs"), data.get("reward_weights"), taken)  # as train does
    used = {k: data[k] for k in CONFIG_KEYS if k in data and k != "reward_heads"}
    unused = sorted(str(k) for k in data if k not in CONFIG_KEYS)
    return heads, used, unused


def prompts_and_pairs(data) -> tuple[list[Any], Any, list[dict] | None]:
    """The prompts of a split, and its held-out preference data: pairs, or unpaired rows (KTO's data).

    Args:
        data: The split.

    Returns:
        ``(prompts, the split or None, the unpaired rows or None)``. With pairs (``chosen`` and ``rejected``): the
        split, an implicit prompt extracted as ``DPOTrainer`` does (:func:`trl_upo.scoring.ensure_prompt`), one
        prompt per row. With unpaired rows (``completion`` and ``label``, no pairs): the rows, checked
        (:func:`trl_upo.evaluation.unpaired_rows`), and their distinct prompts in order (a prompt usually has a
        desirable and an undesirable row). Otherwise: the ``prompt`` column alone.

    Raises:
        UsageError: no ``prompt`` column and no pairs to extract one from, or an unpaired row whose label is not
            a boolean.
    """
    from trl_upo.evaluation import unpaired_rows
    from trl_upo.scoring import ensure_prompt

    cols = set(data.column_names)
    has_pairs = {"chosen", "rejected"} <= cols
    is_unpaired = not has_pairs and {"completion", "label"} <= cols
    if "prompt" not in cols and not has_pairs:
        what = "unpaired rows need" if is_unpaired else "the dataset needs"
        raise UsageError(
            f"{what} a 'prompt' column (or 'chosen' and 'rejected' sharing a prompt); columns: {sorted(cols)}."
        )
    if has_pairs:
        data = ensure_prompt(data)
        return list(data["prompt"]), data, None
    if not is_unpaired:
        return list(data["prompt"]), None, None
    try:
        rows = unpaired_rows(data)
    except ValueError as e:
        raise UsageError(f"{e} (the dataset has 'completion' and 'label', so it is read as unpaired rows)") from None
    seen: dict[str, Any] = {}
    for row in rows:
        seen.setdefault(json.dumps(row["prompt"], sort_keys=True), row["prompt"])
    return list(seen.values()), None, rows
