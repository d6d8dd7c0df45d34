"""Packaged assets: ``upo://<path>`` names ``<path>`` under the installed package's ``trl_upo/resources/``.

Recipes, flags and dataset sources can point at the embedded tiny model and data this way wherever the package is
installed (``upo://tiny-llama``, ``upo://quickstart-data``, ``upo://quickstart.yaml``). Hub names and local paths
never start with the prefix and are used as given.

One rule, applied by every command (:func:`resolve_resource`, :func:`resolve_inputs`, :func:`check_output_path`):
``upo://`` names a packaged *input* only. An output (``output_dir``, ``logging_dir``, ``upo_score_cache_dir``,
``trl-upo score --output``, ...: :data:`OUTPUT_KEYS`) never takes a ``upo://`` value and never lies inside the
installed package, and no ``upo://`` name resolves outside ``trl_upo/resources/`` (``upo://..`` is refused).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: How a value written as a local path starts (anything else may be a Hub id or a packaged asset).
PATH_PREFIXES = ("/", "./", "../", "~")

#: Prefix of packaged assets: ``upo://<path>`` is ``trl_upo/resources/<path>``.
RESOURCE_PREFIX = "upo://"
#: The directory of the packaged assets.
RESOURCES_DIR = Path(__file__).resolve().parent / "resources"
#: The installed package: nothing a command writes may land under it.
PACKAGE_DIR = RESOURCES_DIR.parent
#: Recipe keys and options whose value is a place the command writes to: never a ``upo://`` asset.
OUTPUT_KEYS = frozenset({
    "output_dir", "logging_dir", "log_dir", "upo_score_cache_dir", "output", "shard_dir", "hub_model_id", "push_to_hub",
    "save_dir", "cache_dir", "report_dir", "deepspeed_log_dir",
})


class ResourcePathError(ValueError):
    """A ``upo://`` name used as an output, or one that escapes ``trl_upo/resources/``."""


def resolve_resource(value: Any) -> Any:
    """Replace ``upo://<path>`` by the path of ``<path>`` under the packaged ``trl_upo/resources/`` directory,
    recursively in lists and mappings; any other value is returned unchanged. Mapping keys in :data:`OUTPUT_KEYS`
    are checked with :func:`check_output_path` instead of resolved.

    Args:
        value: A string, or a list or mapping holding strings (other values pass through).

    Returns:
        ``value`` with every ``upo://`` string replaced by a filesystem path.

    Raises:
        FileNotFoundError: the named asset is not in the package (the message lists the packaged assets).
        ResourcePathError: the name escapes ``trl_upo/resources/`` (``upo://..``), or an output key has a
            ``upo://`` value.
    """
    if isinstance(value, str) and value.startswith(RESOURCE_PREFIX):
        return str(_asset_path(value))
    if isinstance(value, list):
        return [resolve_resource(v) for v in value]
    if isinstance(value, dict):
        return resolve_inputs(value)
    return value


def resolve_inputs(mapping: dict[Any, Any], output_keys: Iterable[str] = OUTPUT_KEYS) -> dict[Any, Any]:
    """``mapping`` with ``upo://`` names resolved in every value except those of ``output_keys``, which are checked
    with :func:`check_output_path` (a ``upo://`` output is refused) and kept as given."""
    outputs = set(output_keys)
    out = {}
    for key, value in mapping.items():
        if key in outputs:
            check_output_path(str(key), value)
            out[key] = value
        else:
            out[key] = resolve_resource(value)
    return out


def check_output_path(key: str, value: Any) -> None:
    """Refuse an output that is a ``upo://`` name or lies inside the installed ``trl_upo`` package.

    Args:
        key: The option or recipe key (named in the message).
        value: Its value (non-strings pass: ``push_to_hub: true``).

    Raises:
        ResourcePathError: naming the key, the value and the fix.
    """
    if not isinstance(value, (str, os.PathLike)):
        return
    text = os.fspath(value)
    if text.startswith(RESOURCE_PREFIX):
        raise ResourcePathError(
            f"`{key}` is {text!r}: upo:// names a packaged input (a model, data or recipe shipped with trl_upo), "
            f"never a place to write. Give `{key}` a directory of your own, e.g. outputs/my-run."
        )
    if key in ("hub_model_id",) or not text:
        return
    path = Path(os.path.expanduser(text)).resolve()
    if path == PACKAGE_DIR or PACKAGE_DIR in path.parents:
        raise ResourcePathError(
            f"`{key}` is {text!r}, inside the installed trl_upo package ({PACKAGE_DIR}): a run never writes into "
            f"the package. Give `{key}` a directory of your own, e.g. outputs/my-run."
        )


def _asset_path(value: str) -> Path:
    """The path a ``upo://`` name denotes, contained in :data:`RESOURCES_DIR`."""
    rel = value[len(RESOURCE_PREFIX) :].strip("/")
    path = (RESOURCES_DIR / rel).resolve()
    if path != RESOURCES_DIR and RESOURCES_DIR not in path.parents:
        raise ResourcePathError(
            f"{value!r} leaves trl_upo/resources/ ({path}); upo:// names only the packaged assets: "
            f"{_available()}. Give a local path (./dir, /abs/dir) for anything else."
        )
    if not path.exists():
        raise FileNotFoundError(
            f"{value!r} names {path}, which is not in the installed trl_upo package. Packaged assets: {_available()}."
        )
    return path


def _available() -> list[str]:
    return [RESOURCE_PREFIX + p.name for p in sorted(RESOURCES_DIR.iterdir()) if not p.name.startswith(("_", "."))]


def resolve_flags(tokens: list[str], output_keys: Iterable[str] = OUTPUT_KEYS) -> list[str]:
    """Command-line tokens with ``upo://`` names resolved, except the values of ``--<output key>`` options, which
    :func:`check_output_path` checks (``--output_dir upo://x`` and ``--output_dir=upo://x`` are refused).

    Args:
        tokens: ``--key value`` / ``--key=value`` tokens.
        output_keys: Keys whose values are outputs.

    Returns:
        The tokens, resolved.
    """
    outputs = set(output_keys)
    out: list[str] = []
    key = None
    for tok in tokens:
        if tok.startswith("--"):
            name, eq, value = tok[2:].partition("=")
            name = name.replace("-", "_")
            if eq:
                if name in outputs:
                    check_output_path(name, value)
                    out.append(tok)
                else:
                    out.append(f"--{tok[2:].partition('=')[0]}={resolve_resource(value)}")
                key = None
            else:
                out.append(tok)
                key = name
            continue
        if key in outputs:
            check_output_path(key, tok)
            out.append(tok)
        else:
            out.append(resolve_resource(tok))
        key = None
    return out
