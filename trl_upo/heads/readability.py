"""``readability``: rewards easier-to-read responses (or a target grade band), with the standard formulas of
`textstat <https://github.com/textstat/textstat>`_."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

from ..formats import completion_text
from .protocol import RewardHead
from .registry import register_head
from .schema import Param

#: textstat metric -> True when a higher value means easier text (reading-ease indices), False for grade-like
#: metrics (a higher value means harder text). The head negates the latter so that "easier" always scores higher.
METRICS: dict[str, bool] = {
    "flesch_reading_ease": True,
    "flesch_kincaid_grade": False,
    "gunning_fog": False,
    "smog_index": False,
    "automated_readability_index": False,
    "coleman_liau_index": False,
    "dale_chall_readability_score": False,
    "linsear_write_formula": False,
    "spache_readability": False,
    "mcalpine_eflaw": False,
    "lix": False,
    "rix": False,
    # Formulas for other languages (set ``lang`` accordingly).
    "fernandez_huerta": True,  # Spanish
    "szigriszt_pazos": True,  # Spanish
    "gutierrez_polini": True,  # Spanish
    "crawford": False,  # Spanish, years of schooling
    "gulpease_index": True,  # Italian
}


@register_head("readability")
class ReadabilityHead(RewardHead):
    """Score = the textstat ``metric`` of the response, signed so that easier text scores higher; or, with a target
    band, minus the distance of the metric to ``[target_min, target_max]`` (0 inside the band).

    Parameters: the annotated ``__init__`` signature (the schema; see ``docs/heads/readability.md``).
    """

    parallel_safe = True
    reads_tokenizer = False

    def __init__(
        self,
        metric: Annotated[str, Param("a textstat formula from the table above", choices=tuple(METRICS))] = (
            "flesch_reading_ease"
        ),
        target_min: Annotated[float | None, Param("lower end of the target band, in the metric's units")] = None,
        target_max: Annotated[float | None, Param("upper end of the target band")] = None,
        lang: Annotated[
            str, Param("textstat language (syllable rules, easy-word lists): `en_US`, `es`, `it`, `de`, ...")
        ] = "en_US",
        empty_score: Annotated[float, Param("score of a response without words")] = 0.0,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(
                f"readability head: unknown metric {metric!r}. Use one of {sorted(METRICS)} (textstat function names)."
            )
        for key, value in (("target_min", target_min), ("target_max", target_max), ("empty_score", empty_score)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"readability head: {key} must be a finite number, got {value!r}.")
        if target_min is not None and target_max is not None and target_min > target_max:
            raise ValueError(
                f"readability head: target_min ({target_min}) must be <= target_max ({target_max})."
            )
        self.metric, self.target_min, self.target_max = metric, target_min, target_max
        self.lang, self.empty_score = lang, float(empty_score)
        self._textstat = None

    def fingerprint(self) -> str:
        # Formulas and syllable counts change between textstat releases, and so would the scores.
        from importlib.metadata import version

        return f"{super().fingerprint()}:textstat={version('textstat')}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_textstat"] = None  # rebuilt on first use; keeps pickles small and independent of textstat's caches
        return state

    def _stats(self):
        if self._textstat is None:
            from textstat.textstat import textstatistics

            ts = textstatistics()  # a private instance: textstat's module-level one has global language state
            ts.set_lang(self.lang)
            self._textstat = ts
        return self._textstat

    def value(self, text: str) -> float | None:
        """The raw textstat metric of ``text``, or None when it has no words."""
        ts = self._stats()
        if ts.lexicon_count(text) == 0:
            return None
        return float(getattr(ts, self.metric)(text))

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        role: str,
        columns: dict[str, list[Any]],
        tokenizer: Any = None,
    ) -> list[float]:
        out = []
        for c in completions:
            v = self.value(completion_text(c))
            if v is None:
                out.append(self.empty_score)
            elif self.target_min is not None or self.target_max is not None:
                below = self.target_min - v if self.target_min is not None and v < self.target_min else 0.0
                above = v - self.target_max if self.target_max is not None and v > self.target_max else 0.0
                out.append(-float(below + above))
            else:
                out.append(v if METRICS[self.metric] else -v)
        return out
