"""Iterative UPO rounds (trl_upo.iterate, `trl-upo iterate`): the judge's rows, round directories and resume
detection, config errors raised before any model loads, the report, and (slow) a real 2-round run on the packaged
assets and the resume of a run killed inside round 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT
from trl_upo.cli import iterate as cli_iterate
from trl_upo.iterate import (
    IterateConfig,
    IterateConfigError,
    Judge,
    completed_rounds,
    console_table,
    pair_rows,
    round_dir,
    round_points,
    run_rounds,
    unpaired_rows,
)
from trl_upo.iterate.config import build_training_args

JUDGE = {"name": "on_topic", "type": "function", "params": {"function": "trl_upo.iterate.tasks:on_topic"},
         "threshold": 0.5}
CPU = {"use_cpu": True, "bf16": False, "report_to": "none", "disable_tqdm": True, "per_device_train_batch_size": 8,
       "learning_rate": 2e-3, "logging_steps": 5,
       "reward_heads": [{"name": "novery", "type": "lexicon", "params": {"avoid": ["very"], "mode": "presence"}}]}


def _samples(scores):
    return [{"prompt": p, "completion": f" answer {i}", "judge_score": s}
            for i, (p, s) in enumerate(scores)]


# ---------------------------------------------------------------- the judge and its rows


def test_unpaired_rows_label_by_threshold_and_keep_every_sample():
    rows = unpaired_rows(_samples([("a", 1.0), ("a", 0.0), ("b", 0.5), ("b", 0.49)]), threshold=0.5)
    assert [r["label"] for r in rows] == [True, False, True, False]
    assert [r["completion"] for r in rows] == [" answer 0", " answer 1", " answer 2", " answer 3"]
    assert all(r["judge_score"] is not None for r in rows)


@pytest.mark.parametrize("scores, kind", [([1.0, 1.0], "all"), ([0.0, 0.2], "none")])
def test_unpaired_rows_refuse_a_single_kind(scores, kind):
    with pytest.raises(ValueError, match=f"accepted {kind} of the 2 samples.*threshold"):
        unpaired_rows(_samples([("a", s) for s in scores]), threshold=0.5)


def test_pair_rows_best_against_worst_per_prompt_and_skip_ties():
    rows = pair_rows(_samples([("a", 0.2), ("a", 0.9), ("a", -1.0), ("b", 1.0), ("b", 1.0), ("c", 3.0), ("c", 3.0),
                               ("c", 5.0)]))
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("a", " answer 1", " answer 2"), ("c", " answer 7", " answer 5")]  # b: all equal, no pair; c: first of ties
    assert rows[0]["judge_score_chosen"] == 0.9 and rows[0]["judge_score_rejected"] == -1.0
    with pytest.raises(ValueError, match="scored all samples of each of the 1 prompts equally"):
        pair_rows(_samples([("b", 1.0), ("b", 1.0)]))


def test_judge_scores_through_the_head_registry_and_negates_costs():
    judge = Judge.from_config(JUDGE)
    prompts = ["tell me about cats answer"] * 2
    assert judge.score(prompts, [" purr fur", " rain storm"]).tolist() == [1.0, 0.0]
    assert judge.threshold == 0.5 and judge.spec.name == "on_topic"
    cost = Judge.from_config({**JUDGE, "higher_is_better": False, "threshold": -0.5})
    assert cost.score(prompts, [" purr fur", " rain storm"]).tolist() == [-1.0, -0.0]


@pytest.mark.parametrize("value, match", [
    ({}, "no `judge`"),
    ({**JUDGE, "threshold": "high"}, "threshold must be a finite number"),
    ({"type": "column", "params": {"chosen": "a", "rejected": "b"}}, "cannot score generated responses"),
    ({"type": "functon", "params": {}}, "function"),
])
def test_judge_config_errors(value, match):
    with pytest.raises(ValueError, match=match):
        Judge.from_config(value)


# ---------------------------------------------------------------- round directories and resume detection


def test_completed_rounds_stop_at_the_first_round_without_report(tmp_path):
    out = str(tmp_path)
    assert completed_rounds(out) == []
    for k in (1, 2, 4):
        os.makedirs(round_dir(out, k))
        (tmp_path / f"round-{k}" / "report.json").write_text("{}")
    os.makedirs(round_dir(out, 3))  # round 3 was killed: its directory exists, its report does not
    (tmp_path / "round-3" / "train.jsonl").write_text("")
    assert completed_rounds(out) == [1, 2]
    assert round_dir(out, 3) == os.path.join(out, "round-3")


def test_resume_takes_the_newest_checkpoint_written_to_the_end(tmp_path):
    from trl_upo.iterate.rounds import last_complete_checkpoint

    assert last_complete_checkpoint(str(tmp_path / "none")) is None
    for step, whole in ((2, True), (10, True), (12, False)):  # 12: killed while saving
        (tmp_path / f"checkpoint-{step}").mkdir()
        if whole:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")


def test_resume_refuses_other_settings_but_takes_more_rounds(tmp_path):
    from trl_upo.iterate.rounds import check_snapshot

    config = IterateConfig(output_dir=str(tmp_path), judge=JUDGE)
    check_snapshot(config, main=True)
    check_snapshot(IterateConfig(output_dir=str(tmp_path), judge=JUDGE, rounds=5), main=True)
    with pytest.raises(IterateConfigError, match=r"other settings \(form, samples_per_prompt differ"):
        check_snapshot(IterateConfig(output_dir=str(tmp_path), judge=JUDGE, form="pairs", samples_per_prompt=4),
                       main=True)
    saved = json.loads((tmp_path / "iterate.json").read_text())
    del saved["kto_weights"]  # a run started before the key existed trained with TRL's weights
    (tmp_path / "iterate.json").write_text(json.dumps(saved))
    with pytest.raises(IterateConfigError, match=r"other settings \(kto_weights differ"):
        check_snapshot(IterateConfig(output_dir=str(tmp_path), judge=JUDGE, kto_weights="balanced"), main=False)
    check_snapshot(IterateConfig(output_dir=str(tmp_path), judge=JUDGE), main=False)  # none, the default: resumes


def test_snapshot_keeps_upo_names_and_a_reinstalled_package_resumes(tmp_path, monkeypatch):
    """iterate.json stores `upo://` names as given; they resolve at use, to wherever the package is installed now, so
    a reinstalled package resumes the run; a snapshot written with resolved paths (older runs) is still accepted."""
    import shutil

    import trl_upo.resources
    from trl_upo.iterate.rounds import check_snapshot

    heads = [{"name": "rm", "type": "reward_model", "params": {"model": "upo://tiny-llama"}}]
    config = IterateConfig(output_dir=str(tmp_path / "run"), judge=JUDGE, training={**CPU, "reward_heads": heads})
    check_snapshot(config, main=True)
    saved = json.loads((tmp_path / "run" / "iterate.json").read_text())
    assert saved["model"] == "upo://tiny-llama" and saved["dataset"] == "upo://quickstart-data"
    assert saved["training"]["reward_heads"][0]["params"]["model"] == "upo://tiny-llama"
    assert config.model_path == str(trl_upo.resources.RESOURCES_DIR / "tiny-llama")
    old_paths = {**saved, "model": config.model_path, "dataset": config.dataset_path, "output_dir": str(tmp_path / "old"),
                 "training": trl_upo.resources.resolve_resource(saved["training"])}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "iterate.json").write_text(json.dumps(old_paths))
    check_snapshot(IterateConfig(output_dir=str(tmp_path / "old"), judge=JUDGE,  # resolved paths: accepted
                                 training={**CPU, "reward_heads": heads}), main=False)

    moved = tmp_path / "site-packages" / "trl_upo" / "resources"  # the package, installed elsewhere
    for name in ("tiny-llama", "quickstart-data"):
        shutil.copytree(trl_upo.resources.RESOURCES_DIR / name, moved / name)
    monkeypatch.setattr(trl_upo.resources, "RESOURCES_DIR", moved.resolve())
    again = IterateConfig(output_dir=str(tmp_path / "run"), judge=JUDGE, training={**CPU, "reward_heads": heads})
    check_snapshot(again, main=True)  # same settings as given: no refusal
    assert again.model_path == str(moved.resolve() / "tiny-llama")
    assert again.round_fields(2)["reward_heads"][0]["params"]["model"] == str(moved.resolve() / "tiny-llama")


# ---------------------------------------------------------------- config errors, before any model loads


@pytest.mark.parametrize("values, match", [
    ({"round": 2}, r"unknown key 'round'.*did you mean `rounds`"),
    ({"form": "pair"}, r"`form` must be one of \['pairs', 'unpaired'\]"),
    ({"reference": "first"}, "`reference` must be one of"),
    ({"rounds": 0}, "`rounds` must be an integer >= 1"),
    ({"form": "pairs", "samples_per_prompt": 1}, "samples_per_prompt >= 2"),
    ({"training": {"seed": 3}}, "set them at the top level"),
])
def test_config_errors(values, match):
    with pytest.raises(IterateConfigError, match=match):
        IterateConfig.from_dict(values)


def test_a_key_only_one_rounds_trainer_takes_is_named_with_its_round(tmp_path):
    config = IterateConfig(output_dir=str(tmp_path), judge=JUDGE, training={**CPU, "ld_alpha": 0.5})
    build_training_args(config, 1, str(tmp_path / "round-1"))  # round 1 is DPO: fine
    with pytest.raises(IterateConfigError, match="round 2 trains with UPOKTOConfig.*'ld_alpha'.*later_rounds"):
        build_training_args(config, 2, str(tmp_path / "round-2"))
    with pytest.raises(IterateConfigError, match=r"'learning_rat' \(did you mean `learning_rate`"):
        build_training_args(IterateConfig(judge=JUDGE, later_rounds={"learning_rat": 1.0}), 2, str(tmp_path))


def test_balanced_kto_weights_equalise_the_kinds_inside_trls_range(tmp_path):
    from trl_upo.iterate.config import balanced_kto_weights

    rows = [{"label": True}] * 190 + [{"label": False}] * 2
    w = balanced_kto_weights(rows)
    assert (w["desirable"], w["undesirable"]) == (190, 2)
    assert w["desirable_weight"] * 190 / (w["undesirable_weight"] * 2) == pytest.approx(7 / 6)
    assert (w["desirable_weight"] * 190 + w["undesirable_weight"] * 2) / 192 == pytest.approx(1.0)
    # TRL's KTOTrainer warns unless the desirable weight lies in [u*U/D, 1.33*u*U/D] or the undesirable one in
    # [D*d/(1.33*U), D*d/U], each bound rounded to 2 decimals (as TRL 1.16 computes them): never, for any counts.
    for n_und in [1, 2, 3, 7, 18, 30, 100, 512, 900, 1023]:
        n_des = 1024 - n_und
        w = balanced_kto_weights([{"label": True}] * n_des + [{"label": False}] * n_und)
        d, u = w["desirable_weight"], w["undesirable_weight"]
        assert round(n_und * u / n_des, 2) <= d <= round(n_und * u / n_des * 1.33, 2), n_und
        assert round(n_des * d / n_und / 1.33, 2) <= u <= round(n_des * d / n_und, 2), n_und
    with pytest.raises(IterateConfigError, match="need desirable and undesirable rows; got 3 and 0"):
        balanced_kto_weights([{"label": True}] * 3)
    config = IterateConfig(output_dir=str(tmp_path), judge=JUDGE, training=CPU, kto_weights="balanced")
    assert IterateConfig(judge=JUDGE).kto_weights == "none"  # the default (docs/iterate.md: what it is based on)
    args = build_training_args(config, 2, str(tmp_path / "round-2"),
                               {k: w[k] for k in ("desirable_weight", "undesirable_weight")})
    assert (args.desirable_weight, args.undesirable_weight) == (w["desirable_weight"], w["undesirable_weight"])


@pytest.mark.parametrize("values, match", [
    ({"kto_weights": "balanced", "later_rounds": {"desirable_weight": 0.1}}, r"sets desirable_weight, and `kto_weights: balanced`.*kto_weights: none"),
    ({"kto_weights": "equal"}, r"`kto_weights` must be one of \['balanced', 'none'\]"),
])
def test_kto_weights_errors(values, match):
    with pytest.raises(IterateConfigError, match=match):
        IterateConfig.from_dict({"judge": JUDGE, **values})
    if "later_rounds" in values:  # the user's own weights with kto_weights: none are kept
        IterateConfig.from_dict({"judge": JUDGE, **values, "kto_weights": "none"})


def test_a_round_without_rows_stops_every_process_with_the_same_error(tmp_path, monkeypatch):
    """Two processes, played in turn: the main process merges the shards, finds the judge accepted every sample and
    records the verdict instead of raising alone; every process (the main one too) raises it after the barrier, so
    none waits for a process that stopped. A later attempt decides again."""
    from trl_upo.iterate import rounds

    class State:
        def __init__(self, rank):
            self.process_index, self.num_processes, self.is_main_process = rank, 2, rank == 0

        def wait_for_everyone(self):
            pass

    def all_accepted(config, k, policy, prompts, judge, rank, world):
        return [{"prompt": p, "completion": " ok", "judge_score": 1.0, "prompt_index": i}
                for i, p in enumerate(prompts) if i % world == rank], 3

    monkeypatch.setattr(rounds, "sample_and_judge", all_accepted)
    config = IterateConfig(output_dir=str(tmp_path), judge=JUDGE)
    judge, train = Judge.from_config(JUDGE), [{"prompt": "a"}, {"prompt": "b"}]
    shards = os.path.join(round_dir(str(tmp_path), 2), "samples")
    os.makedirs(shards)
    rounds.write_jsonl(os.path.join(shards, "rank-1.jsonl"), all_accepted(config, 2, "", ["a", "b"], judge, 1, 2)[0])
    rounds.atomic_json(os.path.join(shards, "rank-1.json"), {"generated_tokens": 3})  # rank 1 reached the barrier
    messages = []
    for rank in (0, 1):  # rank 0 merges and records the verdict; rank 1 reads it after the barrier
        with pytest.raises(IterateConfigError) as e:
            rounds.round_data(config, 2, "policy", train, judge, State(rank))
        messages.append(str(e.value))
    assert "accepted all of the 2 samples" in messages[0] and messages[0] == messages[1]
    monkeypatch.setattr(rounds, "sample_and_judge", lambda c, k, p, prompts, j, rank, world: (
        [{"prompt": q, "completion": " ok", "judge_score": float(i), "prompt_index": i}
         for i, q in enumerate(prompts) if i % world == rank], 3))
    out = rounds.round_data(config, 2, "policy", train, judge, State(0))
    assert not os.path.exists(os.path.join(round_dir(str(tmp_path), 2), rounds.ERROR_FILE))
    assert out["accepted"] == 1 and out["num_rows"] == 2


def test_run_rounds_fails_before_loading_anything(tmp_path, monkeypatch):
    import importlib

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the configuration was checked")

    # Every module that binds load_model by name is imported first and patched too: one imported for the first time
    # while only trl_upo.models is patched would keep no_load after the test (and fail later tests that load).
    modules = [importlib.import_module(name) for name in (
        "trl_upo.models", "trl_upo.data.generation", "trl_upo.evaluation", "trl_upo.evaluation.generation",
        "trl_upo.evaluation.implicit", "trl_upo.evaluation.policy")]
    for module in modules:
        monkeypatch.setattr(module, "load_model", no_load)
    out = tmp_path / "run"
    for bad, match in [({"judge": {}}, "no `judge`"),
                       ({"later_rounds": {"ld_alpha": 0.5}}, "round 2 trains with UPOKTOConfig"),
                       ({"generation": {"temprature": 0.7}}, "did you mean `temperature`"),
                       ({"dataset": str(ROOT / "trl_upo" / "resources" / "quickstart-data" / "train.jsonl")},
                        "no test split")]:
        with pytest.raises(IterateConfigError, match=match):
            run_rounds({"output_dir": str(out), "judge": JUDGE, "training": CPU, **bad})
    assert not out.exists()


def test_cli_overrides_and_usage_errors(capsys):
    assert cli_iterate.parse_overrides(["--rounds", "4", "--later_rounds.max_steps=7", "--prompts_per_round", "null",
                                        "--form", "pairs"]) == {
        "rounds": 4, "later_rounds": {"max_steps": 7}, "prompts_per_round": None, "form": "pairs"}
    config = cli_iterate.load_config(["--rounds", "2", "--training.learning_rate", "1e-3"])
    assert config.rounds == 2 and config.training["learning_rate"] == 1e-3
    assert config.training["reward_heads"][0]["name"] == "novery"  # the rest of the packaged default stays
    assert config.model == "upo://tiny-llama"  # as the YAML gives it; resolved at use
    assert config.model_path.endswith(os.path.join("resources", "tiny-llama"))
    assert cli_iterate.main(["--roundz", "2"]) == 2
    assert "unknown key 'roundz'" in capsys.readouterr().err
    assert cli_iterate.main(["--help"]) == 0
    assert "samples_per_prompt" in capsys.readouterr().out


def test_dispatcher_lists_iterate(capsys):
    from trl_upo.cli import main

    assert main(["--help"]) == 0
    assert "iterate" in capsys.readouterr().out


# ---------------------------------------------------------------- the report


def _report(k, acc, very, tokens, steps):
    result = {"preference": {"accuracy": acc}, "designer": {"novery": {"mean": very}}}
    return {"round": k, "before": {"preference": {"accuracy": 0.5}, "designer": {"novery": {"mean": -0.5}}},
            "after": result, "compute": {"generated_tokens": tokens, "train_steps": steps}}


def test_round_points_table_and_plot(tmp_path):
    reports = [_report(1, 0.9, -0.2, 0, 150), _report(2, 0.92, -0.05, 1000, 200)]
    points = round_points(reports)
    assert [(p["round"], p["accuracy"], p["novery"], p["train_steps"]) for p in points] == [
        (0, 0.5, -0.5, 0), (1, 0.9, -0.2, 150), (2, 0.92, -0.05, 200)]
    table = console_table({"upo": reports})
    assert "novery" in table and "-0.050" in table and "1000" in table
    plt = pytest.importorskip("matplotlib.pyplot")
    from trl_upo.iterate import plot_rounds

    path = plot_rounds({"upo": reports, "dpo": reports[:1]}, str(tmp_path / "f.png"), plt)
    assert os.path.getsize(path) > 1000


# ---------------------------------------------------------------- slow: real rounds on the packaged assets

SMALL = ["--rounds", "2", "--first_round.max_steps", "10", "--later_rounds.max_steps", "6", "--samples_per_prompt",
         "8", "--eval_num_prompts", "16", "--eval_num_samples", "2"]


@pytest.mark.slow
def test_two_rounds_on_the_packaged_default(tmp_path):
    """Budget 90 s on 2 busy cores."""
    out = tmp_path / "it"
    reports = run_rounds(cli_iterate.load_config(SMALL + ["--output_dir", str(out)]), log=lambda m: None)
    assert [r["round"] for r in reports] == [1, 2]
    for k, r in enumerate(reports, 1):
        rdir = out / f"round-{k}"
        assert {"report.json", "train.jsonl", "config.json", "model.safetensors", "upo_state.json"} <= set(
            os.listdir(rdir))
        assert json.loads((rdir / "report.json").read_text()) == json.loads(json.dumps(r))
        assert set(r["after"]["designer"]) == {"novery", "on_topic"} and "accuracy" in r["after"]["preference"]
    r1, r2 = reports
    assert r1["trainer"] == "dpo" and r2["trainer"] == "kto" and r2["reference"] == "previous"
    assert r1["before"]["preference"]["accuracy"] == 0.5 and r2["before"] == r1["after"]
    rows = [json.loads(line) for line in (out / "round-2" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 8 and {"prompt", "completion", "label", "judge_score"} <= set(rows[0])
    assert all(r["label"] == (r["judge_score"] >= 0.5) for r in rows)
    assert r2["data"]["accepted"] == sum(r["label"] for r in rows)
    assert r2["compute"]["train_steps"] == 16 and r2["compute"]["generated_tokens"] > 0
    w = r2["data"]["kto_weights"]  # the default, kto_weights: none: TRL's weights, recorded with the round's counts
    assert w["mode"] == "none" and (w["desirable"], w["undesirable"]) == (r2["data"]["accepted"], 32 - w["desirable"])
    assert (w["desirable_weight"], w["undesirable_weight"]) == (1.0, 1.0)
    assert (out / "rounds.json").exists()
    # Run again: every round is complete, nothing is trained again.
    mtime = os.path.getmtime(out / "round-2" / "model.safetensors")
    assert [r["round"] for r in run_rounds(cli_iterate.load_config(SMALL + ["--output_dir", str(out)]),
                                           log=lambda m: None)] == [1, 2]
    assert os.path.getmtime(out / "round-2" / "model.safetensors") == mtime


@pytest.mark.slow
def test_a_run_killed_in_round_two_resumes_there_from_its_checkpoint(tmp_path, monkeypatch):
    """Budget 100 s on 2 busy cores. A real process is killed (SIGKILL) once round 2 saved a checkpoint."""
    out = tmp_path / "it"
    argv = SMALL + ["--output_dir", str(out), "--later_rounds.max_steps", "20", "--later_rounds.save_strategy",
                    "steps", "--later_rounds.save_steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "trl_upo.cli", "iterate", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 150
    try:
        while not list((out / "round-2").glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, "the run ended before round 2 saved a checkpoint"
            assert time.time() < deadline, "round 2 saved no checkpoint in time"
            time.sleep(0.2)
        time.sleep(1.0)  # let the checkpoint finish writing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert completed_rounds(str(out)) == [1]
    round1 = os.path.getmtime(out / "round-1" / "report.json")
    data = (out / "round-2" / "train.jsonl").read_text()

    from trl_upo import UPOKTOTrainer, UPOTrainer

    seen = []
    for cls in (UPOTrainer, UPOKTOTrainer):
        original = cls.train

        def train(self, *a, _original=original, **k):
            seen.append((type(self).__name__, k.get("resume_from_checkpoint")))
            return _original(self, *a, **k)

        monkeypatch.setattr(cls, "train", train)
    reports = run_rounds(cli_iterate.load_config(argv), log=lambda m: None)
    assert [r["round"] for r in reports] == [1, 2]
    assert os.path.getmtime(out / "round-1" / "report.json") == round1  # round 1 was not redone
    assert (out / "round-2" / "train.jsonl").read_text() == data  # round 2's samples were reused
    assert len(seen) == 1 and seen[0][0] == "UPOKTOTrainer" and "checkpoint-" in str(seen[0][1])
    assert reports[1]["compute"]["round_train_steps"] == 20


def test_the_docs_config_block_is_a_valid_iterate_config(tmp_path):
    import re

    import yaml

    text = (ROOT / "docs" / "iterate.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)[1]
    config = IterateConfig.from_dict({**yaml.safe_load(block), "output_dir": str(tmp_path)})
    assert build_training_args(config, 1, str(tmp_path)).max_steps == 150
    assert build_training_args(config, 2, str(tmp_path)).max_steps == 50
    assert Judge.from_config(config.judge).spec.name == "on_topic"


@pytest.mark.slow
def test_tiny_iterate_sweep_writes_results_and_table(tmp_path):
    """examples/iterate_sweep.py at a tiny scale: an offline run and the rounds of two methods. Budget 90 s."""
    from tests.helpers import load_script

    sweep = load_script("examples/iterate_sweep.py")
    out = str(tmp_path / "sweep")
    argv = ["--task", "length", "--seeds", "0", "--offline", "dpo", "--methods", "rounds-upo-pairs,rounds-dpo",
            "--rounds", "2", "--first-steps", "4", "--round-steps", "2", "--samples", "6", "--sft-steps", "4",
            "--n-train", "32", "--n-eval-prompts", "4", "--n-eval-pairs", "8", "--num-samples", "1", "--output-dir", out]
    assert sweep.main(argv) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "length", "results.jsonl"))]
    assert [(r["method"], r["round"]) for r in rows] == [("start", 0), ("dpo", 0), ("rounds-upo-pairs", 1),
                                                         ("rounds-upo-pairs", 2), ("rounds-dpo", 1), ("rounds-dpo", 2)]
    assert rows[1]["compute"]["train_steps"] == 6 and rows[3]["compute"]["train_steps"] == 6
    assert rows[3]["compute"]["generated_tokens"] > 0
    assert "| rounds-dpo | 2 | 1 | 6 |" in open(os.path.join(out, "length", "table.md")).read()


def _launch_two(tmp_path, flags: list[str], timeout: int) -> subprocess.CompletedProcess:
    """`trl-upo iterate` with the SMALL settings and ``flags`` under `accelerate launch --num_processes 2` (Gloo)."""
    import shutil

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "trl_upo.cli.iterate", *SMALL, *flags],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_two_processes_shard_sampling_and_merge_in_prompt_order(tmp_path):
    """`accelerate launch --num_processes 2` (Gloo on CPU): each process samples and judges its share of the prompts,
    the main process merges the shares into train.jsonl, training runs data-parallel. Budget 120 s."""
    out = tmp_path / "it"
    proc = _launch_two(tmp_path, ["--first_round.max_steps", "6", "--later_rounds.max_steps", "4",
                                  "--training.per_device_train_batch_size", "8", "--output_dir", str(out)], 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = [[json.loads(x) for x in (out / "round-2" / "samples" / f"rank-{r}.jsonl").read_text().splitlines()]
              for r in (0, 1)]
    assert [len(s) for s in shards] == [16, 16]  # 4 prompts x 8 samples, 2 prompts per process
    assert {s["prompt_index"] for s in shards[0]} == {0, 2} and {s["prompt_index"] for s in shards[1]} == {1, 3}
    rows = [json.loads(x) for x in (out / "round-2" / "train.jsonl").read_text().splitlines()]
    key = sorted((r["prompt"], r["completion"]) for r in rows)
    assert key == sorted((s["prompt"], s["completion"]) for s in shards[0] + shards[1])
    assert completed_rounds(str(out)) == [1, 2] and proc.stdout.count("round 2 done") == 1


@pytest.mark.slow
def test_two_processes_stop_together_when_the_judge_accepts_nothing(tmp_path):
    """`accelerate launch --num_processes 2`: the judge (threshold 2.0 on a 0/1 function) accepts none of round 2's
    samples; both processes raise the same error and the launch ends (no process waits at a barrier). Budget 120 s."""
    out = tmp_path / "it"
    proc = _launch_two(tmp_path, ["--first_round.max_steps", "4", "--judge.threshold", "2.0", "--output_dir", str(out)],
                       300)
    assert proc.returncode != 0
    message = "the judge accepted none of the 32 samples (threshold 2.0)"
    assert (proc.stdout + proc.stderr).count(message) >= 2, proc.stderr[-3000:]  # each process says it
    assert completed_rounds(str(out)) == [1] and json.loads((out / "round-2" / "data-error.json").read_text())
