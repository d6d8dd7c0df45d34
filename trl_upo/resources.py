"""Packaged assets: ``upo://<path>`` names ``<path>`` under the installed package's ``trl_upo/resources/``.

Recipes, flags and dataset sources can point at the embedded tiny model and data this way wherever the package is
installed (``upo://tiny-llama``, ``upo://quickstart-data``, ``upo://quickstart.yaml``). Hub names and local paths
never start with the prefix and are used as given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: How a value written as a local path starts (anything else may be a Hub id or a packaged asset).
PATH_PREFIXES = ("/", "./", "../", "~")

#: Prefix of packaged assets: ``upo://<path>`` is ``trl_upo/resources/<path>``.
RESOURCE_PREFIX = "upo://"
#: The directory of the packaged assets.
RESOURCES_DIR = Path(__file__).resolve().parent / "resources"


def resolve_resource(value: Any) -> Any:
    """Replace ``upo://<path>`` by the path of ``<path>`` under the packaged ``trl_upo/resources/`` directory,
    recursively in lists and mappings; any other value is returned unchanged.

    Args:
        value: A string, or a list or mapping holding strings (other values pass through).

    Returns:
        ``value`` with every ``upo://`` string replaced by a filesystem path.

    Raises:
        FileNotFoundError: the named asset is not in the package (the message lists the packaged assets).
    """
    if isinstance(value, str) and value.startswith(RESOURCE_PREFIX):
        rel = value[len(RESOURCE_PREFIX) :].strip("/")
        path = RESOURCES_DIR / rel
        if not path.exists():
            available = sorted(p.name for p in RESOURCES_DIR.iterdir() if not p.name.startswith(("_", ".")))
            raise FileNotFoundError(
                f"{value!r} names {path}, which is not in the installed trl_upo package. Packaged assets: "
                f"{[RESOURCE_PREFIX + a for a in available]}."
            )
        return str(path)
    if isinstance(value, list):
        return [resolve_resource(v) for v in value]
    if isinstance(value, dict):
        return {k: resolve_resource(v) for k, v in value.items()}
    return value
