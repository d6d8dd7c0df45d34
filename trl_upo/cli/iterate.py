"""``trl-upo iterate``: iterative UPO rounds (sample the current policy, judge, train again) from a YAML config.

    trl-upo iterate                                   # the CPU default: upo://iterate.yaml (3 rounds, tiny model)
    trl-upo iterate --config iterate.yaml [--key value ...]
    trl-upo iterate --rounds 4 --later_rounds.max_steps 80 --output_dir outputs/it4
    accelerate launch -m trl_upo.cli.iterate --config iterate.yaml   # sampling, judging and training sharded

The config's keys are the fields of ``trl_upo.iterate.IterateConfig`` (see docs/iterate.md). A flag ``--key value``
overrides a top-level key and ``--a.b value`` a key inside a mapping (``--training.learning_rate 1e-3``); values are
read as YAML (``--form pairs``, ``--prompts_per_round null``). Unknown keys are errors that name the closest valid
key, raised before anything loads. A run killed mid-way resumes when the same command is run again.
"""

from __future__ import annotations

import sys
from typing import Any

from trl_upo.cli.common import UsageError, pop_config, read_yaml, run_command

#: The config ``trl-upo iterate`` runs when it is given no ``--config``.
DEFAULT_CONFIG = "upo://iterate.yaml"


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` / ``--a.b value`` flags -> a nested mapping of YAML-parsed values.

    Raises:
        UsageError: a token that is not a flag, or a flag without a value.
    """
    import yaml

    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise UsageError(f"unexpected argument {tok!r}: options are `--key value` (see `trl-upo iterate --help`).")
        if "=" in tok:
            key, raw = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise UsageError(f"`{tok}` needs a value.")
            key, raw = tok[2:], tokens[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        *parents, leaf = key.replace("-", "_").split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; mappings merge key by key."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(argv: list[str]) -> Any:
    """The :class:`~trl_upo.iterate.IterateConfig` of a command line (config file, then flags)."""
    from trl_upo.iterate import IterateConfig
    from trl_upo.resources import resolve_resource

    path, rest = pop_config(argv)
    path = path or resolve_resource(DEFAULT_CONFIG)
    values = merge(read_yaml(path, "iterate config"), parse_overrides(rest))
    return IterateConfig.from_dict(values, where=f"{path} or the flags")


def main(argv: list[str], prog: str = "trl-upo iterate") -> int:
    """Run ``trl-upo iterate``; returns the exit code (2 with one message for a usage problem)."""
    if any(a in ("-h", "--help") for a in argv):
        import dataclasses

        from trl_upo.iterate import IterateConfig

        print(__doc__)
        print("keys (IterateConfig):", ", ".join(f.name for f in dataclasses.fields(IterateConfig)))
        return 0
    from trl_upo.iterate import IterateConfigError

    return run_command(prog, lambda: _run(argv), errors=(IterateConfigError,))


def _run(argv: list[str]) -> int:
    import os

    from trl_upo.cli.common import end_distributed
    from trl_upo.cli.console import silence_upstream_deprecations

    os.environ.setdefault("TQDM_DISABLE", "1")
    config = load_config(argv)
    silence_upstream_deprecations()
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    from trl_upo.iterate import run_rounds

    try:
        run_rounds(config)
    finally:
        end_distributed()
    return 0


if __name__ == "__main__":
    from trl_upo.cli import pop_debug

    sys.exit(main(pop_debug(sys.argv[1:]), prog="python -m trl_upo.cli.iterate"))
