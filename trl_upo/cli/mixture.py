"""The alignment handbook's ``dataset_mixture`` in a ``trl-upo train`` recipe:

    dataset_mixture:
      datasets:
        - id: HuggingFaceH4/ultrafeedback_binarized    # anything trl_upo.data.loading reads: Hub name, file, upo://
          config: default                              # optional: configuration name
          split: train_prefs                           # optional (default train)
          columns: [prompt, chosen, rejected]          # optional: keep only these
          weight: 0.5                                  # optional: the fraction of the rows to use (0 < w <= 1)
      seed: 42                                         # optional: shuffling seed (default 0)
      test_split_size: 0.1                             # optional: hold out this fraction (or row count) as `test`

Each dataset is loaded with :func:`trl_upo.data.loading.load_split`, cut to its first ``weight`` fraction after a
seeded shuffle, the columns kept, and the datasets concatenated and shuffled; ``test_split_size`` splits off a test
split. (TRL's own ``datasets:`` mixture, ``trl.DatasetMixtureConfig``, is accepted too.)
"""

from __future__ import annotations

import json
from typing import Any

from trl_upo.cli.common import UsageError, unknown_key

#: The keys of ``dataset_mixture`` and of each of its ``datasets`` entries.
MIXTURE_KEYS = ("datasets", "seed", "test_split_size")
ENTRY_KEYS = ("id", "config", "split", "columns", "weight")


def check_mixture(value: Any) -> dict[str, Any] | None:
    """Validate a ``dataset_mixture`` value (a mapping, or its JSON on the command line).

    Args:
        value: The value of ``dataset_mixture``.

    Returns:
        The mapping, or None when not given.

    Raises:
        UsageError: every problem found (unknown keys with the closest valid one, a missing ``id``, a weight out
            of range), in one message.
    """
    if value in (None, "", {}):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise UsageError(f"dataset_mixture is not valid JSON ({e}).") from None
    if not isinstance(value, dict) or not isinstance(value.get("datasets"), list) or not value["datasets"]:
        raise UsageError("dataset_mixture must be a mapping with a non-empty `datasets:` list of {id, ...} entries.")
    problems = [unknown_key(str(k), "dataset_mixture", MIXTURE_KEYS) for k in value if k not in MIXTURE_KEYS]
    for j, entry in enumerate(value["datasets"]):
        where = f"dataset_mixture.datasets[{j}]"
        if not isinstance(entry, dict) or not entry.get("id"):
            problems.append(f"{where} needs `id` (a Hub name, file, directory or upo://...)")
            continue
        problems += [unknown_key(str(k), where, ENTRY_KEYS) for k in entry if k not in ENTRY_KEYS]
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or not 0 < weight <= 1:
            problems.append(f"{where}.weight must be a fraction in (0, 1], got {weight!r}")
    size = value.get("test_split_size")
    if size is not None and (not isinstance(size, (int, float)) or size <= 0):
        problems.append(f"dataset_mixture.test_split_size must be a fraction in (0, 1) or a row count, got {size!r}")
    if problems:
        raise UsageError("invalid dataset_mixture:\n  " + "\n  ".join(problems))
    return value


def load_mixture(mixture: dict[str, Any], train_split: str = "train", test_split: str = "test"):
    """Load a checked ``dataset_mixture`` (see the module docstring) as a ``DatasetDict``.

    Args:
        mixture: What :func:`check_mixture` returned.
        train_split: The name of the mixed split.
        test_split: The name of the held-out split (with ``test_split_size``).

    Returns:
        The ``DatasetDict``.

    Raises:
        DatasetLoadError: a dataset that cannot be loaded (see :mod:`trl_upo.data.loading`).
        UsageError: a named column that a dataset does not have, or datasets whose columns differ.
    """
    from datasets import DatasetDict, concatenate_datasets

    from trl_upo.data.loading import load_split, require_columns

    seed = int(mixture.get("seed", 0))
    parts = []
    for entry in mixture["datasets"]:
        ds = load_split(entry["id"], entry.get("split", "train"), config_name=entry.get("config"))
        columns = entry.get("columns")
        if columns:
            require_columns(ds, columns, entry["id"], "dataset_mixture: columns")
            ds = ds.select_columns(list(columns))
        weight = float(entry.get("weight", 1.0))
        if weight < 1.0:
            ds = ds.shuffle(seed=seed).select(range(max(1, int(len(ds) * weight))))
        parts.append(ds)
    names = [sorted(p.column_names) for p in parts]
    if any(n != names[0] for n in names):
        raise UsageError(f"dataset_mixture: the datasets have different columns {names}; choose them with `columns`.")
    mixed = concatenate_datasets(parts).shuffle(seed=seed)
    size = mixture.get("test_split_size")
    if not size:
        return DatasetDict({train_split: mixed})
    split = mixed.train_test_split(test_size=size, seed=seed)
    return DatasetDict({train_split: split["train"], test_split: split["test"]})
