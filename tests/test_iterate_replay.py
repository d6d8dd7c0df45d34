"""``IterateConfig.replay`` (trl_upo.iterate.replay): rounds >= 2 add a share of the original train rows to their own
judged samples. The round's ``train.jsonl`` holds exactly what it trains on, each row marked by ``source``; counts are
exact in both forms; bad values fail before any model loads. No model is trained here: the sampling is replaced by a
fixed list of judged samples, and the real runs are the sweep in docs/iterate.md."""

from __future__ import annotations

import json
import os

import pytest

from trl_upo.cli import iterate as cli_iterate
from trl_upo.iterate import IterateConfig, IterateConfigError, Judge, pair_rows, round_dir, unpaired_rows
from trl_upo.iterate import rounds
from trl_upo.iterate.replay import REPLAY, SAMPLE, SOURCE, check_replay_data, mix_rows, replay_count, replay_rows

JUDGE = {"name": "on_topic", "type": "function", "params": {"function": "trl_upo.iterate.tasks:on_topic"},
         "threshold": 0.5}
PAIRS = [{"prompt": f"tell me about {t} answer", "chosen": f" {t} good {i}", "rejected": f" other {i}", "extra": i}
         for i, t in enumerate(["cats", "dogs", "food", "rain", "cats"])]


class MainProcess:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass


def _judged(config, k, policy, prompts, judge, rank, world):
    """Two samples per prompt, the first accepted, the second not (score 1.0 / 0.0), 7 tokens in all."""
    return [{"prompt": p, "completion": f" sample {i}.{j}", "judge_score": float(j == 0), "prompt_index": i}
            for i, p in enumerate(prompts) for j in range(2)], 7


def test_replay_rows_of_each_form_and_their_counts():
    unpaired = replay_rows(PAIRS, 1.0, "unpaired", seed=0, k=2)
    assert len(unpaired) == 2 * len(PAIRS)  # a pair gives a desirable and an undesirable row, in the data's order
    for pair, good, bad in zip(PAIRS, unpaired[0::2], unpaired[1::2], strict=True):
        assert good == {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True, SOURCE: REPLAY}
        assert bad == {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False, SOURCE: REPLAY}
    paired = replay_rows(PAIRS, 1.0, "pairs", seed=0, k=2)
    assert paired == [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], SOURCE: REPLAY}
                      for p in PAIRS]
    # A share: f * N rows rounded half up, at least 1, drawn per round with the seed (the same rows when run again).
    assert [replay_count(5, f) for f in (0, 0.01, 0.3, 0.5, 1.0)] == [0, 1, 2, 3, 5]
    assert replay_count(400, 0.25) == 100 and replay_count(0, 1.0) == 0
    some = replay_rows(PAIRS, 0.4, "pairs", seed=3, k=2)
    assert len(some) == 2 and some == replay_rows(PAIRS, 0.4, "pairs", seed=3, k=2)
    assert {r["chosen"] for r in some} <= {p["chosen"] for p in PAIRS}
    assert replay_rows(PAIRS, 0.0, "unpaired", seed=0, k=2) == []
    # Original unpaired rows are replayed as they are (labels as booleans).
    rows = [{"prompt": "p", "completion": " a", "label": 1}, {"prompt": "p", "completion": " b", "label": 0}]
    assert replay_rows(rows, 1.0, "unpaired", 0, 2) == [{"prompt": "p", "completion": " a", "label": True,
                                                         SOURCE: REPLAY},
                                                        {"prompt": "p", "completion": " b", "label": False,
                                                         SOURCE: REPLAY}]


def test_mixed_rows_share_every_column_and_no_replay_changes_nothing():
    sampled = [{"prompt": "p", "completion": " s", "judge_score": 1.0, "prompt_index": 0, "label": True}]
    assert mix_rows(sampled, []) is sampled  # replay 0: the rows of a run without replay, no `source` column
    mixed = mix_rows(sampled, replay_rows(PAIRS[:1], 1.0, "unpaired", 0, 2))
    assert [r[SOURCE] for r in mixed] == [SAMPLE, REPLAY, REPLAY]
    assert all(set(r) == {"prompt", "completion", "judge_score", "prompt_index", "label", SOURCE} for r in mixed)
    assert mixed[1]["judge_score"] is None and mixed[1]["prompt_index"] is None


@pytest.mark.parametrize("form", ["unpaired", "pairs"])
def test_the_rounds_data_file_holds_the_samples_and_the_replayed_rows(tmp_path, monkeypatch, form):
    monkeypatch.setattr(rounds, "sample_and_judge", _judged)
    config = IterateConfig(output_dir=str(tmp_path), judge=JUDGE, form=form, replay=1.0)
    out = rounds.round_data(config, 2, "policy", PAIRS, Judge.from_config(JUDGE), MainProcess())
    n_prompts = 4  # distinct prompts of PAIRS
    sampled = 2 * n_prompts if form == "unpaired" else n_prompts  # pairs: one best-against-worst pair per prompt
    replayed = 2 * len(PAIRS) if form == "unpaired" else len(PAIRS)
    rows = out.pop("rows")
    assert out == {"generated_tokens": 7, "samples": 2 * n_prompts, "prompts": n_prompts, "accepted": n_prompts,
                   "num_rows": sampled + replayed, "form": form, "replay": 1.0, "sampled_rows": sampled,
                   "replayed_rows": replayed, "replayed_original_rows": len(PAIRS)}
    path = os.path.join(round_dir(str(tmp_path), 2), rounds.DATA_FILE)
    assert rounds.read_jsonl(path) == rows  # the file is what the round trains on
    assert sum(r[SOURCE] == SAMPLE for r in rows) == sampled and sum(r[SOURCE] == REPLAY for r in rows) == replayed
    assert all(r["judge_score" if form == "unpaired" else "judge_score_chosen"] is None
               for r in rows if r[SOURCE] == REPLAY)
    assert all("extra" not in r for r in rows)  # only the columns the trainer reads are replayed
    if form == "unpaired":
        assert sum(r["label"] for r in rows if r[SOURCE] == REPLAY) == len(PAIRS)
        assert {r["completion"] for r in rows if r[SOURCE] == REPLAY and r["label"]} == {p["chosen"] for p in PAIRS}
    # A resumed round reads its data from disk: nothing is sampled, judged or drawn again.
    monkeypatch.setattr(rounds, "sample_and_judge", lambda *a: pytest.fail("sampled again on resume"))
    again = rounds.round_data(config, 2, "policy", PAIRS, Judge.from_config(JUDGE), MainProcess())
    assert again["rows"] == rows


def test_without_replay_the_rounds_data_is_the_samples_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(rounds, "sample_and_judge", _judged)
    config = IterateConfig(output_dir=str(tmp_path), judge=JUDGE)
    assert config.replay == 0.0  # the default: docs/iterate.md, "Replaying the original pairs"
    out = rounds.round_data(config, 2, "policy", PAIRS, Judge.from_config(JUDGE), MainProcess())
    assert out["num_rows"] == 8 and "replayed_rows" not in out
    assert all(SOURCE not in r and r["judge_score"] is not None for r in out["rows"])


@pytest.mark.parametrize("value", [-0.1, 1.5, "half", True, float("nan"), None])
def test_replay_errors(value):
    with pytest.raises(IterateConfigError, match=r"`replay` must be a number in \[0, 1\]"):
        IterateConfig.from_dict({"judge": JUDGE, "replay": value})


def test_replay_flag_and_its_errors():
    assert cli_iterate.load_config(["--replay", "0.5"]).replay == 0.5
    with pytest.raises(IterateConfigError, match=r"`replay` must be a number in \[0, 1\].*got 2"):
        cli_iterate.load_config(["--replay", "2"])


def test_data_that_cannot_be_replayed_is_named(tmp_path):
    unpaired = [{"prompt": "p", "completion": " a", "label": True}]
    with pytest.raises(IterateConfigError, match=r"`form: pairs`.*unpaired \(completion, label\).*form: unpaired"):
        check_replay_data(unpaired, "pairs")
    check_replay_data(unpaired, "unpaired")
    with pytest.raises(IterateConfigError, match=r"`replay` needs train rows with `prompt`.*\['chosen', 'rejected'\]"):
        check_replay_data([{"chosen": " a", "rejected": " b"}], "unpaired")
    # The run refuses it before any model loads (the session reads the data first).
    from trl_upo.iterate.session import Session

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired * 4))
    config = IterateConfig(output_dir=str(tmp_path / "run"), dataset=str(data), judge=JUDGE, trainer="kto",
                           form="pairs", replay=1.0, training={"use_cpu": True, "report_to": "none"})
    with pytest.raises(IterateConfigError, match="`form: pairs` replays the original pairs"):
        Session(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("form", ["unpaired", "pairs"])
def test_replayed_rows_give_a_round_the_kind_its_samples_lack(tmp_path, monkeypatch, form):
    """The judge accepts every sample: without replay the round has no undesirable row (no pair) and stops; the
    replayed original rows have both kinds (are pairs), so the round trains on them and the samples."""
    accepted = [{"prompt": "tell me about cats answer", "completion": " cats", "judge_score": 1.0}] * 3
    with pytest.raises(ValueError, match="accepted all of the 3 samples"):
        unpaired_rows(accepted, 0.5)
    assert len(unpaired_rows(accepted, 0.5, replay_rows(PAIRS, 0.2, "unpaired", 0, 2))) == 3
    with pytest.raises(ValueError, match="no preference pair"):
        pair_rows(accepted)
    assert pair_rows(accepted, replay_rows(PAIRS, 0.2, "pairs", 0, 2)) == []
    monkeypatch.setattr(rounds, "sample_and_judge", lambda c, k, p, prompts, j, rank, world: (
        [{"prompt": q, "completion": " ok", "judge_score": 1.0, "prompt_index": i} for i, q in enumerate(prompts)], 3))
    config = IterateConfig(output_dir=str(tmp_path), judge=JUDGE, form=form, replay=0.2)
    out = rounds.round_data(config, 2, "policy", PAIRS, Judge.from_config(JUDGE), MainProcess())
    sampled = 4 if form == "unpaired" else 0
    assert (out["sampled_rows"], out["replayed_rows"]) == (sampled, 2 if form == "unpaired" else 1)
    assert out["num_rows"] == len(out["rows"]) == sampled + out["replayed_rows"]
