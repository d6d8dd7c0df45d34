"""The model card's UPO section (trl_upo/card.py): what it says, where it goes in TRL's card, the score summary it
shows, the card of a real tiny run (saved, and pushed to a local stand-in of the Hub), and the card that
``trl-upo train`` writes for the quickstart (``save_strategy: no``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from tests.helpers import cpu_args
from trl_upo import UPOTrainer
from trl_upo.card import BEGIN, END, add_upo_section, save_card, train_score_summary, upo_section, write_upo_section

ROOT = Path(__file__).resolve().parents[1]

STATE = {
    "trl_upo_version": "0.1.0",
    "heads": [
        {"name": "brevity", "type": "length", "weight": 0.5, "normalize": None, "higher_is_better": False,
         "params": {"unit": "words"}},
        {"name": "overlong", "type": "function", "weight": 2.0, "normalize": "rank", "higher_is_better": True,
         "params": {"function": "trl.rewards:get_soft_overlong_punishment(max_completion_len=512, "
                                "soft_punish_cache=64)"}},
    ],
    "statistics": [{"mode": "zscore", "count": 8, "mean": 12.5, "std": 3.0}, {"mode": "rank", "count": 8}],
    "settings": {"upo_alpha": 0.75, "upo_temperature": 0.25, "upo_weight_cap": 100.0, "upo_normalize_weights": True,
                 "upo_baseline": "batch", "upo_applies_to": "chosen", "upo_loglik": "mean",
                 "upo_normalization": "zscore", "upo_combine": "awr"},
}
REPORT = {
    "before": {"designer": {"brevity": {"mean": 20.0}}, "preference": {"accuracy": 0.5, "policy_logp_accuracy": 0.625},
               "generation": {"num_prompts": 16, "num_samples": 2}},
    "after": {"designer": {"brevity": {"mean": 14.25}}, "preference": {"accuracy": 0.875, "policy_logp_accuracy": 0.75},
              "generation": {"num_prompts": 16, "num_samples": 2}},
}
TRL_CARD = ("---\ntags:\n- trl\n---\n\n# Model Card for m\n\n## Training procedure\n\nThis model was trained with UPO."
            "\n\n## Citations\n\nCite TRL as:\n")


def test_section_names_the_objective_heads_report_and_citation():
    summary = {"brevity": {"mean": 11.0, "n": 40, "agree": 0.25, "ties": 0.1}}
    text = upo_section(STATE, summary, REPORT)
    assert text.startswith(BEGIN) and text.rstrip().endswith(END)
    assert "**`upo_alpha = 0.75`**" in text and "combine mode: `awr`" in text and "normalisation: `zscore`" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")}
    assert "`length`" in rows["`brevity`"] and "| 0.5 |" in rows["`brevity`"] and "lower is better" in rows["`brevity`"]
    assert "`unit=words`" in rows["`brevity`"] and "zscore (mean 12.5, std 3)" in rows["`brevity`"]
    assert "0.250 of untied pairs prefer chosen (40 pairs, 0.100 tied)" in rows["`brevity`"]
    assert "get_soft_overlong_punishment(max_completion_len=512, soft_punish_cache=64)" in rows["`overlong`"]
    assert "| 2 |" in rows["`overlong`"] and "not measured" in rows["`overlong`"]
    assert "| `brevity` (mean) | 20 | 14.25 | -5.75 |" in text
    assert "| preference accuracy | 0.5 | 0.875 | +0.375 |" in text
    assert "16 held-out prompts x 2 sampled answers" in text
    assert "@article{badrinath2025unified" in text
    assert "Before and after" not in upo_section(STATE)


def test_section_extends_trls_card_once_before_its_citations(tmp_path):
    (tmp_path / "README.md").write_text(TRL_CARD)
    add_upo_section(tmp_path, STATE)
    path = add_upo_section(tmp_path, STATE, report=REPORT)  # a later save replaces the section
    text = Path(path).read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and "Before and after" in text
    assert text.startswith(TRL_CARD.split("## Citations")[0]) and text.index(END) < text.index("## Citations")
    assert text.rstrip().endswith("Cite TRL as:")
    # A card that already cites UPO (TRL's citations section, from the trainer's _paper) is not given it twice.
    (tmp_path / "README.md").write_text(TRL_CARD + "@article{badrinath2025unified,\n}\n")
    text = Path(add_upo_section(tmp_path, STATE)).read_text()
    assert text.count("badrinath2025unified") == 1 and "as given under Citations below" in text
    # No card yet: one holding the section.
    assert BEGIN in Path(add_upo_section(tmp_path / "new", STATE)).read_text()


def test_train_score_summary_pairs_and_unpaired_rows():
    paired = Dataset.from_dict({"upo_brevity_chosen": [1.0, 2.0, 3.0, 4.0],
                                "upo_brevity_rejected": [2.0, 2.0, 1.0, 5.0]})
    s = train_score_summary(paired, [STATE["heads"][0]])["brevity"]  # lower is better: chosen lower wins
    assert s["n"] == 4 and s["mean"] == pytest.approx(2.5) and s["ties"] == pytest.approx(0.25)
    assert s["agree"] == pytest.approx(2 / 3)
    unpaired = Dataset.from_dict({"upo_x_completion": [0.0, 1.0, 2.0, 3.0], "label": [False, False, True, True]})
    s = train_score_summary(unpaired, [{"name": "x"}, {"name": "missing"}])
    assert set(s) == {"x"} and s["x"]["label_corr"] == pytest.approx(0.8944, abs=1e-4)
    assert "correlation with the label 0.894 (4 rows)" in upo_section({**STATE, "heads": [{"name": "x"}],
                                                                        "statistics": [{}]}, s)


def test_reward_funcs_factories_are_recorded_by_function_and_arguments(tmp_path):
    """A ``reward_funcs`` factory is named by its function and arguments in the config, upo_state.json and the
    card, not as trl_upo.cli.rewards:RewardFactory; pickling keeps the name."""
    import pickle

    from trl_upo.cli.rewards import reward_func_heads
    from trl_upo.fingerprints import jsonable
    from trl_upo.heads import build_head
    from trl_upo.state import build_state

    heads = reward_func_heads(["get_soft_overlong_punishment(max_completion_len=512, soft_punish_cache=64)"], [0.5])
    args = cpu_args(tmp_path, reward_heads=heads)
    expected = "trl.rewards:get_soft_overlong_punishment(max_completion_len=512, soft_punish_cache=64)"
    assert args.to_dict()["reward_heads"][0]["params"]["function"] == expected
    state = build_state(args.head_specs, [build_head(s) for s in args.head_specs], [{}], args)
    assert json.loads(json.dumps(state))["heads"][0]["params"]["function"] == expected
    assert expected in upo_section(state)
    factory = args.head_specs[0].params["function"]
    factory = getattr(factory, "fn", factory)  # the config keeps callables in a SavedCallable
    again = pickle.loads(pickle.dumps(factory))
    assert repr(again) == expected.partition(":")[2] and jsonable(again) == expected


def test_real_run_card_saved_and_pushed(tiny_model_path, train_dataset, tmp_path, score_cache, monkeypatch):
    """A tiny real run with save_strategy 'no': save_card writes TRL's card with the UPO section (head, weight,
    alpha, the train-split summary, the report); push_to_hub (to a local stand-in for the Hub) uploads it with the
    section when the trainer's create_model_card adds it, the report kept."""
    import transformers.trainer as hf_trainer

    out = tmp_path / "out"
    args = cpu_args(out, max_steps=1, upo_alpha=0.75, upo_score_cache_dir=score_cache,
                    reward_heads=[{"name": "length", "weight": 0.5, "params": {"unit": "words"}}])
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train_dataset)
    trainer.train()
    import trl_upo.card as card_module

    summaries = []
    real_summary = card_module.train_score_summary
    monkeypatch.setattr(card_module, "train_score_summary", lambda *a: summaries.append(1) or real_summary(*a))
    trainer.save_model(str(out))  # save_model alone writes the card, UPO section included (save_strategy 'no')
    saved = (out / "README.md").read_text()
    assert saved.count(BEGIN) == 1 and "**`upo_alpha = 0.75`**" in saved and "| `length` |" in saved
    text = Path(save_card(trainer, str(out), report=REPORT)).read_text()
    assert "# Model Card for out" in text and "This model was trained with UPO" in text  # TRL's card, kept
    # TRL links the Hub page of "None" for a model from a local directory; the card names the directory instead.
    assert "[None](" not in text and f"the local model `{Path(tiny_model_path).name}`" in text
    assert text.count(BEGIN) == 1 and "**`upo_alpha = 0.75`**" in text
    row = next(line for line in text.splitlines() if line.startswith("| `length`"))
    assert "| 0.5 |" in row and "`unit=words`" in row and "of untied pairs prefer chosen (32 pairs" in row
    assert "| preference accuracy | 0.5 | 0.875 | +0.375 |" in text

    uploaded = {}

    class Hub:
        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded[repo_id] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: Hub())
    monkeypatch.setattr(trainer, "init_hf_repo", lambda **kw: setattr(trainer, "hub_model_id", "me/tiny-upo"))
    trainer.push_to_hub(blocking=True)
    pushed = uploaded["me/tiny-upo"]
    assert pushed.count(BEGIN) == 1 and "**`upo_alpha = 0.75`**" in pushed and "| `length` |" in pushed
    assert "| preference accuracy | 0.5 | 0.875 | +0.375 |" in pushed and "me/tiny-upo" in pushed
    # The train split's score summary is read once for the run, however often the card is written (save_model,
    # save_card, push_to_hub; every checkpoint in a run with a save_strategy).
    assert len(summaries) == 1


@pytest.mark.slow
def test_quickstart_card_with_save_strategy_no(tmp_path):
    """`trl-upo train` (the quickstart: save_strategy no) writes README.md: TRL's card with the UPO section naming
    the head, its weight, upo_alpha and the before/after numbers of report.json. Measured: 39 s on 2 cores shared
    with other jobs (about 15 s of CPU); the default suite has the in-process run above."""
    exe = shutil.which("trl-upo", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "trl_upo.cli"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    out = tmp_path / "out"
    proc = subprocess.run([*cmd, "train", "--max_steps", "2", "--report_num_prompts", "8", "--report_num_samples", "1",
                           "--output_dir", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    card = (out / "README.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert "This model was trained with UPO" in card and card.count(BEGIN) == 1
    assert "**`upo_alpha = 1`**" in card
    row = next(line for line in card.splitlines() if line.startswith("| `novery`"))
    assert "`lexicon`" in row and "| 1 |" in row and "`avoid=['very']`" in row and "(400 pairs" in row
    for name in ("before", "after"):
        assert f"{report[name]['designer']['novery']['mean']:.4g}" in card.split("`novery` (mean)")[1].split("\n")[0]
    assert "README.md" in proc.stdout
