"""The per-row value layout (trl_upo/layout.py) and the step's one gather (trl_upo/step.py): names, not positions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from trl_upo.collator import VALUES_COLUMN, add_values_column
from trl_upo.heads import parse_head_specs
from trl_upo.layout import ValueLayout
from trl_upo.scoring import ROLES, UNPAIRED_ROLES, score_column
from trl_upo.step import UPOStep

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_columns_by_name_for_two_heads():
    """Raw scores role by role, then normalised scores in the same order, then r_aux of each role."""
    layout = ValueLayout.of(["a", "b"])
    assert layout.width == 10
    assert layout.columns == [
        "upo/a/chosen", "upo/b/chosen", "upo/a/rejected", "upo/b/rejected",
        "upo/a/chosen_norm", "upo/b/chosen_norm", "upo/a/rejected_norm", "upo/b/rejected_norm",
        "upo/reward_aux/chosen", "upo/reward_aux/rejected",
    ]
    assert layout.raw_index("b", "rejected") == 3
    assert layout.norm_index("a", "rejected") == 6
    assert layout.reward_aux_index("rejected") == 9
    assert layout.log_order[:4] == ["upo/a/chosen", "upo/a/rejected", "upo/a/chosen_norm", "upo/a/rejected_norm"]


def test_unpaired_layout():
    layout = ValueLayout.of(["a"], UNPAIRED_ROLES)
    assert layout.columns == ["upo/a/completion", "upo/a/completion_norm", "upo/reward_aux/completion"]
    assert layout.reward_aux_index("completion") == layout.width - 1 == 2


def test_the_values_column_is_laid_out_by_the_layout():
    """add_values_column writes each value where the layout says: the raw score of head b on the rejected answer sits
    at raw_index('b', 'rejected'), and r_aux (z-scored, weights 1 and 2) at reward_aux_index."""
    specs = parse_head_specs([{"name": "length", "weight": 1.0, "params": {"unit": "chars"}},
                              {"name": "column", "weight": 2.0, "params": {"chosen": "s", "rejected": "t"}}])
    names = [s.name for s in specs]
    rows = {score_column(n, r): [float(i + 10 * j + 100 * k) for i in range(4)]
            for j, n in enumerate(names) for k, r in enumerate(ROLES)}
    stats = [{"mode": "none"}, {"mode": "none"}]
    ds = add_values_column(Dataset.from_dict(rows), specs, stats)
    values = torch.tensor(ds[VALUES_COLUMN], dtype=torch.float64)
    layout = ValueLayout.of(names)
    assert values.shape == (4, layout.width)
    b = names[1]
    assert values[:, layout.raw_index(b, "rejected")].tolist() == rows[score_column(b, "rejected")]
    sign = [1.0 if s.higher_is_better else -1.0 for s in specs]
    expected = [sign[0] * rows[score_column(names[0], "chosen")][i] + 2 * sign[1] * rows[score_column(b, "chosen")][i]
                for i in range(4)]
    assert layout.reward_aux(values, "chosen").tolist() == expected


class _OneProcess:
    num_processes = 1
    process_index = 0


def _step(values, layout):
    mask = torch.ones(values.size(0) * len(layout.roles), 5, dtype=torch.long)
    return UPOStep(args=None, inputs={"completion_mask": mask}, values=values, layout=layout, policy_logps=None,
                   ref_logps=None, accelerator=_OneProcess(), capacity=values.size(0), trl_class=Dataset, path="fused")


def test_gather_names_columns_and_gathers_once():
    layout = ValueLayout.of(["a"])
    values = torch.arange(2 * layout.width, dtype=torch.float64).reshape(2, layout.width)
    step = _step(values, layout)
    g = step.gather(loglik=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), label=torch.tensor([True, False]))
    assert g["loglik"].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert g["label"].tolist() == [1.0, 0.0]  # a (B,) column comes back as (G,)
    assert g.reward_aux("rejected").tolist() == values[:, layout.reward_aux_index("rejected")].tolist()
    assert g.value_mean("upo/a/rejected").item() == values[:, 1].mean().item()
    assert step.gathered is g
    with pytest.raises(RuntimeError, match="gathers once"):
        step.gather()


def test_a_term_that_does_not_gather_is_an_error():
    layout = ValueLayout.of(["a"])
    with pytest.raises(RuntimeError, match="did not gather"):
        _step(torch.zeros(1, layout.width, dtype=torch.float64), layout).gathered


def _documented_metrics() -> set[str]:
    text = (DOCS / "metrics.md").read_text()
    return {m for cell in re.findall(r"^\| (.*?) \|", text, re.M) for m in re.findall(r"`(upo/[^`]+)`", cell)}


@pytest.mark.parametrize("roles", [ROLES, UNPAIRED_ROLES], ids=["pairs", "unpaired"])
def test_the_metric_table_documents_every_value_of_the_layout(roles):
    documented = _documented_metrics()
    missing = [n for n in ValueLayout.of(["<head>"], roles).log_order if n not in documented]
    assert not missing, f"docs/metrics.md does not document {missing}"
