"""``trl-upo eval``: JSON, Markdown and PNG outputs on the tiny model (full model + reference, PEFT adapter,
conversational saved dataset, YAML heads, reward-model win rate), and bad input rejected with exit code 2."""

from __future__ import annotations

import copy
import json
import os

import pytest
import yaml

from trl_upo.cli import main as cli
from tests.tiny import preference_dataset, save_tiny_model
from trl_upo.quickstart import NOVERY_HEAD
from trl_upo.quickstart_task import preference_rows

PNG = b"\x89PNG\r\n\x1a\n"
HEADS = json.dumps([
    NOVERY_HEAD,
    {"name": "length", "params": {"direction": "shorter"}},
])


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("cli-eval-policy")), seed=4)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cli-eval-data") / "test.jsonl"
    with open(path, "w") as f:
        for row in preference_rows(6, seed=11):
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_eval_writes_json_markdown_and_plots(policy_path, tiny_model_path, tiny_reward_model_path, data_file,
                                             tmp_path, capsys):
    out = tmp_path / "eval"
    rc = cli(["eval", "--model_name_or_path", policy_path, "--ref-model", tiny_model_path, "--dataset_name", data_file,
              "--reward_heads", HEADS, "--reward-model", tiny_reward_model_path, "--num-prompts", "4",
              "--num-samples", "2", "--max-new-tokens", "6", "--dataset_test_split", "train", "--output-dir",
              str(out)])
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["reference"]["kind"] == "ref_model" and res["dataset"]["rows"] == 4
    assert res["model"] == policy_path and res["dataset"] == {"name": data_file, "split": "train", "rows": 4}
    assert set(res["designer"]) == {"novery", "length"} and res["designer"]["length"]["n"] == 8
    assert set(res["designer_reference"]) == {"novery", "length"}
    assert res["preference"]["n"] == 4 and len(res["preference"]["margins"]) == 4
    assert res["preference"]["reference"] == "ref_model"
    w = res["win_rate"]
    assert w["n"] == 8 and 0.0 <= w["win_rate"] <= 1.0
    report = (out / "report.md").read_text()
    for text in ("## Designer metrics", "| novery | higher |", "implicit-reward accuracy", "win rate",
                 "![designer](designer.png)", "## Samples"):
        assert text in report
    for png in ("designer.png", "margins.png"):
        assert (out / png).read_bytes()[:8] == PNG
    assert "pref. accuracy (implicit reward)" in capsys.readouterr().out


def test_eval_peft_adapter_conversational_saved_dataset_yaml_heads(tiny_model_path, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from trl_upo.evaluation import load_model

    adapter = str(tmp_path / "adapter")
    model = get_peft_model(copy.deepcopy(load_model(tiny_model_path)),
                           LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(adapter)
    data_dir = str(tmp_path / "saved")
    preference_dataset(5, seed=12, conversational=True).save_to_disk(data_dir)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({
        "reward_heads": [{"name": "length", "params": {"direction": "shorter"}}], "beta": 0.5, "learning_rate": 1e-4,
    }))
    out = tmp_path / "eval"
    rc = cli(["eval", "--model", adapter, "--dataset", data_dir, "--config", str(config), "--num-prompts", "3",
              "--max-new-tokens", "4", "--greedy", "--no-plots", "--output-dir", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "not used by eval: learning_rate" in err
    res = json.loads((out / "eval.json").read_text())
    assert res["reference"]["kind"] == "adapter_disabled"
    assert res["preference"]["reference"] == "adapter_disabled" and res["preference"]["beta"] == 0.5
    assert res["designer"]["length"]["n"] == 3 and res["generation"]["do_sample"] is False
    assert isinstance(res["samples"][0]["prompt"], list)  # conversational prompts kept as messages
    assert not (out / "designer.png").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--heads", '[{"name": "length", "wieght": 1}]'], "did you mean 'weight'"),
        (["--heads", '[{"name": "lenght"}]'], "Did you mean 'length'"),
        (["--heads", "[{name: length}]"], "--reward_heads is not valid JSON"),
        (["--heads", '[{"name": "c", "type": "column", "params": {"chosen": "a", "rejected": "b"}}]'],
         "reads dataset columns"),
        (["--split", "validation", "--dataset", "SAVED"], "has no split 'validation'"),
        (["--dataset", "./no/such/file.jsonl"], "does not exist"),
        (["--reward-model", "RM"], "there is no reference"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--config", "recipe.yaml", "--heads", "[]"], "either with --reward_heads (--heads) or in --config"),
        (["--dataset_name", "SAVED"], "--dataset_name and --dataset are the same option"),
        (["--model_name_or_path", "M", "--split", "x", "--dataset-test-split", "y"],
         "--model_name_or_path and --model are the same option (--model is its old name): give it once; "
         "--dataset-test-split and --split are the same option"),
    ],
)
def test_eval_bad_input(policy_path, tiny_reward_model_path, data_file, tmp_path, capsys, extra, message):
    saved = str(tmp_path / "dd")
    from datasets import DatasetDict

    DatasetDict({"test": preference_dataset(3, seed=1)}).save_to_disk(saved)
    extra = [saved if x == "SAVED" else tiny_reward_model_path if x == "RM" else policy_path if x == "M" else x
             for x in extra]
    argv = ["eval", "--model", policy_path, "--output-dir", str(tmp_path / "o"), "--max-new-tokens", "2",
            "--no-plots", "--num-prompts", "2"]
    if "--dataset" not in extra:
        argv += ["--dataset", data_file]
    if "--dataset_name" in extra:  # given twice, under both names
        argv += ["--dataset", data_file]
    rc = cli(argv + extra)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "eval.json")


def test_win_rate_by_hand(tiny_reward_model_path):
    """Win rate = share of (prompt, sample) pairs where the reward model scores the policy's response higher."""
    from trl_upo.cli.eval import win_rate
    from trl_upo.heads.reward_model import RewardModelHead

    prompts = ["tell me about cats answer", "tell me about rain answer"]
    policy = [["cats purr", "very very"], ["rain clouds"]]
    reference = [["the a", "cats purr"], ["rain clouds"]]
    head = RewardModelHead(model=tiny_reward_model_path)
    a = head.score([prompts[0], prompts[0], prompts[1]], ["cats purr", "very very", "rain clouds"], role="chosen",
                   columns={})
    b = head.score([prompts[0], prompts[0], prompts[1]], ["the a", "cats purr", "rain clouds"], role="chosen",
                   columns={})
    expected = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / 3
    got = win_rate(tiny_reward_model_path, prompts, policy, reference)
    assert got["n"] == 3 and got["win_rate"] == pytest.approx(expected)
    assert a[2] == b[2]  # the identical third pair is a tie and counts half
    same = win_rate(tiny_reward_model_path, prompts, policy, policy)
    assert same["win_rate"] == 0.5


def test_flags_take_underscores_like_the_other_commands_and_dashes_too():
    from trl_upo.cli.eval import make_parser

    parser = make_parser("trl-upo eval")
    a = parser.parse_args(["--model", "m", "--dataset", "d", "--output_dir", "o", "--num_samples", "3",
                           "--ref-model", "r", "--max_new_tokens", "5"])
    assert (a.output_dir, a.num_samples, a.ref_model, a.max_new_tokens) == ("o", 3, "r", 5)


def test_train_names_and_their_old_aliases_parse_the_same():
    """train's names (--model_name_or_path, --dataset_name, --dataset_test_split, --reward_heads) and eval's old ones
    (--model, --dataset, --split, --heads) fill the same options; --help shows both; the old attribute names read
    the new fields."""
    from trl_upo.cli.eval import ALIASES, make_parser, parse_args

    new = parse_args(["--model_name_or_path", "m", "--dataset_name", "d", "--dataset_test_split", "s",
                      "--reward_heads", "[]", "--output_dir", "o"], "trl-upo eval")
    old = parse_args(["--model", "m", "--dataset", "d", "--split", "s", "--heads", "[]", "--output_dir", "o"],
                     "trl-upo eval")
    assert new == old
    assert (new.model_name_or_path, new.dataset_name, new.dataset_test_split, new.reward_heads) == ("m", "d", "s", "[]")
    assert (old.model, old.dataset, old.split, old.heads) == ("m", "d", "s", "[]")
    usage = make_parser("trl-upo eval").format_help()
    for name, alias in ALIASES.items():
        assert f"--{name}" in usage and f"--{alias}" in usage


def test_eval_report_quality_plots_table_and_upo_paths(policy_path, tmp_path, capsys, monkeypatch):
    """upo:// for the reference and the dataset; a console table with the reference next to the policy; plots at
    150 dpi with axis labels, model names and a length panel that shows words (not negative scores); a train recipe
    as --config gives one short line, not its keys."""
    from PIL import Image

    out = tmp_path / "eval"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"reward_heads": json.loads(HEADS), "beta": 0.1, "learning_rate": 1e-3,
                                      "max_steps": 5, "output_dir": "x"}))
    rc = cli(["eval", "--model", policy_path, "--ref_model", "upo://tiny-llama", "--dataset", "upo://quickstart-data",
              "--config", str(recipe), "--num_prompts", "4", "--num_samples", "2", "--max_new_tokens", "6",
              "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "eval reads reward_heads and beta from it; not used by eval: learning_rate, max_steps, output_dir." in (
        captured.err)
    lines = captured.out.splitlines()
    header = next(line for line in lines if "tiny-llama" in line)
    assert "change" in header and os.path.basename(policy_path) in header
    length_row = next(line for line in lines if line.startswith("length: length (words)"))
    assert "lower is better" in length_row and "-" not in length_row.split()[3]  # words are positive
    res = json.loads((out / "eval.json").read_text())
    assert res["designer"]["length"]["mean"] < 0  # the head's raw score, as stored
    img = Image.open(out / "designer.png")
    assert img.size[0] >= 1000 and img.size[1] >= 600
    assert round(img.info["dpi"][0]) == 150


def _drawn(result: dict, tmp_path) -> dict:
    """draw_plots on ``result``, the figures kept open: {file name: figure}."""
    from trl_upo.cli.eval_report import draw_plots
    from trl_upo.evaluation import require_matplotlib

    plt, figures = require_matplotlib(), {}

    class KeepOpen:  # pyplot, except that close() keeps the figure for the checks
        def __getattr__(self, name):
            return getattr(plt, name)

        def close(self, fig):
            figures[f"{len(figures)}"] = fig

    written = draw_plots(result, str(tmp_path), KeepOpen())
    return dict(zip(written, figures.values(), strict=True))


def test_plots_keep_every_text_inside_and_readable_and_error_bars_inside_the_range(tmp_path):
    """One head, long model names (the case whose titles were clipped): every text of designer.png and margins.png
    lies inside the figure; the value of a short bar is written outside it in dark text, that of a tall bar inside in
    white; the error bars are the 95% confidence interval, and stop at the head's range (a lexicon head that only
    avoids words scores at most 0)."""
    avoid = {"name": "avoid", "type": "lexicon", "params": {"avoid": ["very"], "mode": "presence"}}
    result = {
        "model": "outputs/frontier/very/seed0/upo-alpha1-temperature0.25-long-name",
        "reference": {"kind": "ref_model", "path": "outputs/frontier/very/seed0/sft-start-model-long-name"},
        "heads": [avoid],
        "generation": {"num_prompts": 64, "num_samples": 2},
        "designer": {"avoid": {"mean": -0.03, "std": 0.17, "n": 128, "ci95": [-0.06, 0.0], "range": [-1.0, 0.0],
                               "higher_is_better": True, "type": "lexicon"}},
        "designer_reference": {"avoid": {"mean": -0.6, "std": 0.49, "n": 128, "ci95": [-0.69, -0.51],
                                         "range": [-1.0, 0.0], "higher_is_better": True, "type": "lexicon"}},
        "preference": {"margins": [0.5, 1.0, -0.2, 2.0, 1.5, 0.7], "accuracy": 0.833, "n": 6,
                       "reference": "ref_model"},
    }
    figures = _drawn(result, tmp_path)
    assert set(figures) == {"designer.png", "margins.png"}
    for name, fig in figures.items():
        drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # everything drawn (titles, labels, ticks), in inches
        width, height = fig.get_size_inches()
        assert drawn.x0 >= 0 and drawn.y0 >= 0 and drawn.x1 <= width and drawn.y1 <= height, (name, drawn)
    ax = figures["designer.png"].axes[0]
    labels = {t.get_text(): t for t in ax.texts}
    short, tall = labels["-0.03"], labels["-0.6"]
    assert short.get_color() == "#222222" and short.xy[1] == -0.06  # below the short bar's error bar
    assert tall.get_color() == "white" and tall.xy[1] == 0.0  # inside the tall bar, by the zero line
    from matplotlib.container import ErrorbarContainer

    (errorbars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    low_caps, high_caps = errorbars.lines[1]  # reference, then policy
    assert list(low_caps.get_ydata()) == pytest.approx([-0.69, -0.06])
    assert list(high_caps.get_ydata()) == pytest.approx([-0.51, 0.0])  # the policy's stops at the range's 0
    assert "95% confidence interval" in figures["designer.png"]._suptitle.get_text()


def test_eval_without_matplotlib_warns_and_skips_the_plots(policy_path, data_file, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "eval"
    rc = cli(["eval", "--model", policy_path, "--dataset", data_file, "--heads", HEADS, "--num_prompts", "2",
              "--max_new_tokens", "4", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 0
    assert "warning: Plots need matplotlib" in err and "The plots are skipped" in err
    assert (out / "eval.json").is_file() and not (out / "designer.png").exists()


def _unpaired_rows(n_pairs: int, seed: int) -> list[dict]:
    """Preference pairs split into a desirable and an undesirable row each (KTO's unpaired form)."""
    return [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
            for r in preference_rows(n_pairs, seed=seed) for k in ("chosen", "rejected")]


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_eval_unpaired_rows_reports_kto_metrics(policy_path, tiny_model_path, tmp_path, capsys):
    """Rows with completion and a boolean label: the unpaired metrics against the reference, equal to
    trl_upo.evaluation.unpaired_metrics on the same rows, in eval.json, report.md and the console table; designer
    metrics on the distinct prompts; no "preference metrics skipped"."""
    from trl_upo.evaluation import unpaired_metrics

    rows = _unpaired_rows(4, seed=13)
    data = _write_jsonl(tmp_path / "kto.jsonl", rows)
    out = tmp_path / "eval"
    rc = cli(["eval", "--model", policy_path, "--ref_model", tiny_model_path, "--dataset", data, "--heads", HEADS,
              "--num_prompts", "8", "--max_new_tokens", "4", "--greedy", "--no_plots", "--beta", "0.5",
              "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "preference metrics skipped" not in captured.err and "4 desirable, 4 undesirable" in captured.err
    expected = unpaired_metrics(policy_path, None, rows, ref_model=tiny_model_path, beta=0.5)
    res = json.loads((out / "eval.json").read_text())
    got = res["unpaired"]
    assert set(got) == set(expected) and res["preference"] == {}
    for key, value in expected.items():
        assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert (got["n_desirable"], got["n_undesirable"], got["reference"]) == (4, 4, "ref_model")
    assert got["desirable_reward_mean"] != got["undesirable_reward_mean"]
    distinct = len({r["prompt"] for r in rows})
    assert res["generation"]["num_prompts"] == distinct and res["designer"]["length"]["n"] == distinct
    report = (out / "report.md").read_text()
    assert "## Preferences (held-out unpaired rows)" in report and "Skipped" not in report
    for key in ("accuracy", "ranking_accuracy", "desirable_reward_mean", "undesirable_reward_mean"):
        assert f"{expected[key]:.4f}" in report, key
    assert "4 desirable and 4 undesirable rows; implicit-reward accuracies (reference: the given ref_model)" in report
    acc = next(line for line in captured.out.splitlines() if line.startswith("unpaired accuracy (implicit reward)"))
    assert f"{expected['accuracy']:.4f}" in acc and "4 desirable + 4 undesirable rows" in acc
    rank = next(line for line in captured.out.splitlines() if line.startswith("unpaired ranking accuracy"))
    assert f"{expected['ranking_accuracy']:.4f}" in rank


def test_eval_unpaired_rows_of_one_kind_leave_the_ranking_accuracy_empty(policy_path, tmp_path, capsys):
    rows = [r for r in _unpaired_rows(3, seed=14) if r["label"]]
    out = tmp_path / "eval"
    rc = cli(["eval", "--model", policy_path, "--dataset", _write_jsonl(tmp_path / "good.jsonl", rows),
              "--max_new_tokens", "2", "--greedy", "--no_plots", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "every row is desirable: the ranking accuracy needs both kinds" in err
    res = json.loads((out / "eval.json").read_text())  # strict JSON: no NaN
    assert res["unpaired"]["ranking_accuracy"] is None and res["unpaired"]["n_undesirable"] == 0
    # no reference: every reward is beta * log pi < 0, so the sign accuracy says nothing and is not reported
    assert res["unpaired"]["reference"] == "none" and res["unpaired"]["accuracy"] is None
    assert "NaN" not in (out / "eval.json").read_text()


def test_eval_prompts_only_says_why_preference_metrics_are_skipped(policy_path, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "tell me about cats"}, {"prompt": "tell me about rain"}])
    out = tmp_path / "eval"
    rc = cli(["eval", "--model", policy_path, "--dataset", data, "--heads", HEADS, "--max_new_tokens", "2",
              "--no_plots", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "preference metrics skipped: the dataset has neither `chosen` and `rejected`" in err
    assert "unpaired rows (prompt, completion, boolean label)" in err
    report = (out / "report.md").read_text()
    assert "## Preferences\n\nSkipped:" in report
    assert json.loads((out / "eval.json").read_text())["unpaired"] == {}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "p", "completion": "a", "label": "yes"}, {"prompt": "p", "completion": "b", "label": "no"}],
         "row 0 has label 'yes'; labels must be True (desirable) or False"),
        ([{"completion": "a", "label": True}, {"completion": "b", "label": False}],
         "unpaired rows need a 'prompt' column"),
    ],
)
def test_eval_bad_unpaired_rows_fail_before_generation(policy_path, tmp_path, capsys, rows, message):
    out = tmp_path / "o"
    rc = cli(["eval", "--model", policy_path, "--dataset", _write_jsonl(tmp_path / "bad.jsonl", rows), "--no_plots",
              "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Generating" not in err
    assert not out.exists()
