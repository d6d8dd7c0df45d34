"""Plots of evaluation results need matplotlib, an optional dependency (the ``eval`` extra)."""

from __future__ import annotations

from typing import Any


def require_matplotlib() -> Any:
    """Import ``matplotlib.pyplot`` with the non-interactive Agg backend, or explain how to install it.

    Raises:
        ImportError: when matplotlib is missing, naming the ``eval`` extra that provides it.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "Plots need matplotlib, which is not installed: pip install 'trl-upo[eval]' (or pip install matplotlib)."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
