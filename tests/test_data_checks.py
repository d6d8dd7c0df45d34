"""The checks that need no scores (``trl_upo.data.checks``): a null value, a missing chat template and prompts that
fill ``max_length`` are clear errors naming the row, column or setting and the fix, before any scoring."""

from __future__ import annotations

import copy

import pytest
from datasets import Dataset

from trl_upo.data.checks import check_prepared_rows, check_split
from trl_upo.formats import DataError

LONG = " ".join(["tell me about cats"] * 30)  # 120 tokens with the tiny tokenizer


def _pairs(prompt="tell me", n=4, **row):
    return Dataset.from_list([{"prompt": prompt, "chosen": " a", "rejected": " b", **row} for _ in range(n)])


def _messages(text):
    return [{"role": "user", "content": text}]


def test_null_response_names_row_and_column():
    rows = Dataset.from_list([{"prompt": "p", "chosen": " a", "rejected": " b"}] * 3
                             + [{"prompt": "p", "chosen": " a", "rejected": None}])
    with pytest.raises(DataError, match=r"Row 3 of the train dataset has no 'rejected' \(null\)"):
        check_split(rows, "train")
    # a selection is checked as the rows the trainer sees: row 0 of it is the null one
    with pytest.raises(DataError, match="Row 0 of the eval dataset has no 'rejected'"):
        check_split(rows.select([3, 0]), "eval")
    check_split(rows.select([0, 1]), "train")


def test_null_unpaired_completion():
    rows = Dataset.from_list([{"prompt": "p", "completion": " a", "label": True},
                              {"prompt": "p", "completion": None, "label": False},
                              {"prompt": "p", "completion": " c", "label": None}])
    with pytest.raises(DataError, match=r"Row 1 of the train dataset has no 'completion' \(null\)"):
        check_split(rows, "train")
    check_split(rows.select([0, 2]), "train")  # a missing label is the KTO adapter's check (unpaired_dataset)


def test_conversational_data_without_chat_template(tokenizer):
    rows = Dataset.from_list([{"prompt": _messages("hi"), "chosen": [{"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "assistant", "content": "b"}]}] * 2)
    check_split(rows, "train", tokenizer=tokenizer)
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(DataError, match="conversational .* no chat template.*tokenizer.chat_template.*standard format"):
        check_split(rows, "train", tokenizer=no_template)
    check_split(_pairs(), "train", tokenizer=no_template)  # standard rows need no template


@pytest.mark.parametrize("conversational", [False, True])
def test_every_prompt_filling_max_length(tokenizer, conversational):
    prompt = _messages(LONG) if conversational else LONG
    if conversational:
        rows = Dataset.from_list([{"prompt": prompt, "completion": [{"role": "assistant", "content": "a"}],
                                   "label": True}] * 5)
    else:
        rows = _pairs(prompt, n=5)
    with pytest.raises(DataError, match=r"Every prompt of the train dataset \(5 rows\) is at least max_length=16 "
                                        r"tokens long \(the shortest: 1\d\d tokens\).*Raise max_length"):
        check_split(rows, "train", tokenizer=tokenizer, max_length=16)
    check_split(rows, "train", tokenizer=tokenizer, max_length=400)  # room left
    check_split(rows, "train", tokenizer=tokenizer, max_length=16, truncation_mode="keep_end")  # nothing dropped
    check_split(rows, "train", tokenizer=tokenizer)  # no max_length: no truncation


def test_one_prompt_that_fits_is_enough(tokenizer):
    rows = Dataset.from_list([{"prompt": LONG, "chosen": " a", "rejected": " b"}] * 70
                             + [{"prompt": "tell me", "chosen": " a", "rejected": " b"}])
    check_split(rows, "train", tokenizer=tokenizer, max_length=16)  # row 70, past the first batch, fits


def test_prepared_rows():
    check_prepared_rows(_pairs(n=3), 3, "train", 16)
    with pytest.raises(DataError, match="left none of its 4 rows.*max_length=16"):
        check_prepared_rows(_pairs(n=0), 4, "train", 16)


def test_prepared_rows_warns_on_dropped_rows(caplog):
    with caplog.at_level("WARNING", logger="trl_upo.data.checks"):
        check_prepared_rows(_pairs(n=3), 5, "train", 16)
    assert "TRL dropped 2 of the 5 rows of the train dataset" in caplog.text


def test_check_splits_reads_the_config(tokenizer):
    from types import SimpleNamespace

    from trl_upo.data.checks import check_splits

    rows = _pairs(LONG, n=3)
    with pytest.raises(DataError, match="Every prompt of the eval dataset"):
        check_splits(_pairs(), {"eval": rows}, tokenizer, SimpleNamespace(max_length=16, truncation_mode="keep_start"))
    # prompts cut to their own max_prompt_length first (older TRL configs): no row is dropped for its prompt
    check_splits(rows, None, tokenizer, SimpleNamespace(max_length=16, max_prompt_length=8))
