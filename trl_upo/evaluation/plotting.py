"""Plots of evaluation results: matplotlib, an optional dependency (the ``eval`` extra), and the helpers that keep
the text of a plot readable (titles wrapped to the figure, value labels placed where they contrast)."""

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


#: The average width of a character, as a share of the font size (matplotlib's default sans-serif font).
CHAR_WIDTH = 0.58
#: A value label goes inside its bar when the bar is at least this share of the y axis's span tall, else outside.
INSIDE_MIN_SHARE = 0.18


def wrap_text(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped into lines that fit ``width_in`` inches at ``fontsize`` points (each existing line wrapped
    on its own), so that a title is never cut off at the figure's edge."""
    import textwrap

    chars = max(8, int(width_in * 72 / (CHAR_WIDTH * fontsize)))
    return "\n".join(textwrap.fill(line, chars) if line else line for line in text.split("\n"))


def label_bars(ax: Any, xs: Any, values: list[float], intervals: list[list[float] | None], fontsize: float = 9,
               inside_color: str = "white", outside_color: str = "#222222") -> None:
    """Write each bar's value on the axes ``ax`` where it can be read: inside the bar next to the zero line (in
    ``inside_color``, bold) when the bar is tall enough for it, else beyond the end of the bar and its error bar (in
    ``outside_color``), widening the y axis so that the label stays inside the axes.

    Args:
        ax: The axes, with the bars drawn (their limits are read).
        xs: The bars' x positions.
        values: The bars' heights.
        intervals: Each bar's error bar ``[low, high]`` (None: none).
        fontsize: The labels' font size.
        inside_color: The colour of a label inside its bar (it must contrast with the bar).
        outside_color: The colour of a label outside (it must contrast with the background).
    """
    low, high = ax.get_ylim()
    span = high - low
    pad = 0.09 * span  # room for one line of text beyond an error bar, in data units
    for x, value, interval in zip(xs, values, intervals, strict=True):
        text = f"{value:.3g}"
        up = value >= 0
        if abs(value) >= INSIDE_MIN_SHARE * span:
            ax.annotate(text, (x, 0.0), xytext=(0, 4 if up else -4), textcoords="offset points", ha="center",
                        va="bottom" if up else "top", fontsize=fontsize, color=inside_color, weight="bold")
            continue
        end = max(value, interval[1]) if up and interval else min(value, interval[0]) if interval else value
        ax.annotate(text, (x, end), xytext=(0, 3 if up else -3), textcoords="offset points", ha="center",
                    va="bottom" if up else "top", fontsize=fontsize, color=outside_color, weight="bold")
        if up:
            high = max(high, end + pad)
        else:
            low = min(low, end - pad)
    ax.set_ylim(low, high)
