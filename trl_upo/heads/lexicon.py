"""``lexicon``: rewards responses that use words, phrases or patterns to encourage, and avoid the ones to avoid."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any

from ..formats import completion_text
from .protocol import RewardHead
from .registry import register_head
from .schema import Param

MODES = ("presence", "count", "rate")


def _as_terms(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"lexicon head: {key} must be a list of strings, got {type(value).__name__}.")
    terms = []
    for t in value:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"lexicon head: {key} holds {t!r}; every entry must be a non-empty string.")
        terms.append(t)
    return terms


def _plain_pattern(term: str) -> str:
    # Whole words only: the term may not be glued to other word characters. Lookarounds instead of \b so that
    # terms that start or end with punctuation ("C++", "!!") still match. Any whitespace between a phrase's words.
    body = r"\s+".join(re.escape(w) for w in term.split())
    return rf"(?<!\w){body}(?!\w)"


@register_head("lexicon")
class LexiconHead(RewardHead):
    """Score = (matches of ``encourage`` terms) - (matches of ``avoid`` terms), counted per ``mode``.

    All terms are compiled into one regular expression and matched in one left-to-right pass; matches do not
    overlap, and at one position the longest plain term (or, with ``regex``, the first pattern listed) wins.

    ``mode``: ``"presence"`` (each term counts at most once per response), ``"count"`` (every match), or
    ``"rate"`` (matches per 100 whitespace-separated words). Parameters: the annotated ``__init__`` signature (the
    schema; see ``docs/heads/lexicon.md``).
    """

    parallel_safe = True
    reads_tokenizer = False

    def __init__(
        self,
        avoid: Annotated[
            list[str] | str | None,
            Param("words, phrases or patterns that lower the score (a single string is one term)", default_doc="`[]`"),
        ] = None,
        encourage: Annotated[
            list[str] | str | None,
            Param("words, phrases or patterns that raise it; at least one of the two lists must be non-empty",
                  default_doc="`[]`"),
        ] = None,
        regex: Annotated[
            bool,
            Param("treat the terms as regular expressions (numbered backreferences are not supported; use named "
                  "groups)"),
        ] = False,
        case_sensitive: Annotated[bool, Param("match case exactly")] = False,
        mode: Annotated[str, Param("`count`, `presence` or `rate`", choices=MODES)] = "count",
    ) -> None:
        avoid_terms, encourage_terms = _as_terms(avoid, "avoid"), _as_terms(encourage, "encourage")
        if not avoid_terms and not encourage_terms:
            raise ValueError(
                "lexicon head: the lexicon is empty. Give params.avoid and/or params.encourage, e.g. "
                "{'avoid': ['as an AI'], 'encourage': ['because']}."
            )
        if mode not in MODES:
            raise ValueError(f"lexicon head: mode must be one of {list(MODES)}, got {mode!r}.")
        for key, value in (("regex", regex), ("case_sensitive", case_sensitive)):
            if not isinstance(value, bool):
                raise ValueError(f"lexicon head: {key} must be true or false, got {value!r}.")
        flags = 0 if case_sensitive else re.IGNORECASE
        norm = (lambda t: t) if case_sensitive else str.casefold
        both = {norm(t) for t in avoid_terms} & {norm(t) for t in encourage_terms}
        if both:
            raise ValueError(f"lexicon head: {sorted(both)} listed in both avoid and encourage; keep each in one list.")
        entries = [(t, -1.0) for t in avoid_terms] + [(t, 1.0) for t in encourage_terms]
        if not regex:
            # Longest first, so that a phrase wins over a word it starts with ("very good" over "very").
            entries.sort(key=lambda e: -len(e[0]))
        parts, self._signs = [], {}
        group = 1
        for term, sign in entries:
            pattern = term if regex else _plain_pattern(term)
            try:
                compiled = re.compile(pattern, flags)
            except re.error as e:
                raise ValueError(f"lexicon head: {term!r} is not a valid regular expression: {e}.") from None
            if compiled.fullmatch("") is not None:
                raise ValueError(
                    f"lexicon head: pattern {term!r} matches the empty string, so it would match everywhere; make it "
                    f"match at least one character."
                )
            parts.append(f"({pattern})")
            self._signs[group] = (sign, term)
            group += 1 + compiled.groups  # the wrapping group, then the pattern's own groups
        try:
            self._regex = re.compile("|".join(parts), flags)
        except re.error as e:  # e.g. the same named group in two patterns
            raise ValueError(f"lexicon head: the patterns cannot be combined into one expression: {e}.") from None
        self.mode = mode

    def matches(self, text: str) -> list[tuple[str, float]]:
        """The (term, sign) of every match in ``text``, in order."""
        out = []
        for m in self._regex.finditer(text):
            if m.end() > m.start():  # a zero-width match (a lookaround-only pattern) is not a use of the term
                # The wrapping group closes after any group inside it, so lastindex is the wrapping group.
                sign, term = self._signs[m.lastindex]
                out.append((term, sign))
        return out

    def _score_text(self, text: str) -> float:
        found = self.matches(text)
        if self.mode == "presence":
            return float(sum(sign for term, sign in dict(found).items()))
        total = float(sum(sign for _, sign in found))
        if self.mode == "count":
            return total
        n_words = len(text.split())
        return 100.0 * total / n_words if n_words else 0.0

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        role: str,
        columns: dict[str, list[Any]],
        tokenizer: Any = None,
    ) -> list[float]:
        return [self._score_text(completion_text(c)) for c in completions]
