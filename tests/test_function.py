"""A dataset column named like a reward function's own argument gets a clear error (issue 23, item 9)."""

from __future__ import annotations

import pytest

from trl_upo.heads.function import RESERVED_ARGUMENTS, FunctionHead


def reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("column", ["completions", "prompts"])
def test_a_column_named_like_the_functions_argument(column):
    """Before: a bare `TypeError: got multiple values for keyword argument 'completions'`."""
    head = FunctionHead(reward)
    with pytest.raises(ValueError, match=f"the dataset has column\\(s\\) \\['{column}'\\].*Rename the column"):
        head.score(["p"], ["a b"], role="chosen", columns={column: ["x"]})
    assert column in RESERVED_ARGUMENTS


def test_other_columns_are_passed_on():
    seen = {}

    def fn(completions, topic, **kwargs):
        seen["topic"] = topic
        return [0.0] * len(completions)

    assert FunctionHead(fn).score(["p"], ["a"], role="chosen", columns={"topic": ["cats"]}) == [0.0]
    assert seen["topic"] == ["cats"]
