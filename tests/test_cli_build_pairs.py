"""``trl-upo build-pairs``: flags and YAML configs (strict keys), both methods end to end, errors with exit code 2
before any generation, and (slow) a killed process that resumes to the same file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from trl_upo.cli import main as trl_upo
from trl_upo.quickstart_task import TOPICS


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _prompt_file(tmp_path, n=4) -> str:
    topics = list(TOPICS)
    return _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"tell me about {topics[i % 4]} answer"} for i in
                                                     range(n)])


def _read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_rank_from_yaml_with_flag_override_prints_column_heads(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "cands.jsonl", [
        {"prompt": "p0", "c": [" a very b", " a"]},
        {"prompt": "p1", "c": [" x y z", " very"]},
    ])
    config = tmp_path / "rank.yaml"
    config.write_text(yaml.safe_dump({
        "method": "rank",
        "dataset": data,
        "candidates_column": "c",
        "reward_heads": [{"name": "novery", "type": "lexicon", "params": {"avoid": ["very"]}}],
        "output": str(tmp_path / "ignored.jsonl"),
        "progress": False,
    }))
    out = tmp_path / "pairs.jsonl"
    assert trl_upo(["build-pairs", "--config", str(config), "--output", str(out)]) == 0
    rows = _read_jsonl(out)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(" a", " a very b"), (" x y z", " very")]
    assert rows[0]["score_novery_chosen"] == 0.0 and rows[0]["score_novery_rejected"] == -1.0
    assert not (tmp_path / "ignored.jsonl").exists()
    printed = capsys.readouterr().out
    assert "Wrote 2 pairs from 2 prompts" in printed
    snippet = yaml.safe_load(printed[printed.index("reward_heads:"):])
    assert snippet["reward_heads"][0]["params"] == {"chosen": "score_novery_chosen", "rejected": "score_novery_rejected"}
    from trl_upo import UPOConfig

    UPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False, **snippet)


def test_rank_generated_with_reward_model_flag(tiny_model_path, tiny_reward_model_path, tmp_path):
    out = tmp_path / "rm.parquet"
    code = trl_upo([
        "build-pairs", "rank", "--dataset", _prompt_file(tmp_path), "--model", tiny_model_path,
        "--num_candidates", "2", "--max_new_tokens", "4", "--reward_model", tiny_reward_model_path,
        "--output", str(out), "--no-progress", "--batch_size", "2",
    ])  # fmt: skip
    assert code == 0
    from datasets import Dataset

    ds = Dataset.from_parquet(str(out))
    assert len(ds) == 4 and {"score_reward_model_chosen", "score_reward_model_rejected"} <= set(ds.column_names)
    assert all(c > r for c, r in zip(ds["score_reward_model_chosen"], ds["score_reward_model_rejected"], strict=True))


def test_critique_cli_with_principles_in_yaml(tiny_model_path, tmp_path):
    config = tmp_path / "critique.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": _prompt_file(tmp_path, 2),
        "model": tiny_model_path,
        "max_new_tokens": 4,
        "principles": [{"name": "brief", "critique_request": "What is too long?", "revision_request": "Shorten it."}],
        "output": str(tmp_path / "c.jsonl"),
        "progress": False,
    }))
    assert trl_upo(["build-pairs", "critique", "--config", str(config)]) == 0
    rows = _read_jsonl(tmp_path / "c.jsonl")
    assert len(rows) == 2 and {r["principle"] for r in rows} == {"brief"}
    assert set(rows[0]) == {"prompt", "chosen", "rejected", "critique", "principle"}


HEADS = '[{"name": "length"}]'


@pytest.mark.parametrize(
    "args, yaml_data, match",
    [
        (["rank"], {"max_new_token": 4}, r"unknown key\(s\) for `build-pairs rank`: 'max_new_token' \(did you mean 'max_new_tokens'\?\)"),
        (["critique"], {"candidates_column": "c"}, r"unknown key\(s\) for `build-pairs critique`: 'candidates_column'"),
        (["rank"], {"method": "critique"}, "command line says 'rank'"),
        (["rnak"], {}, "Did you mean 'rank'"),
        ([], {}, "Name the method"),
        (["rank", "--model", "MODEL", "--num_candidates", "1", "--reward_heads", HEADS], {}, "num_candidates must be an integer >= 2"),
        (["rank", "--model", "MODEL", "--num_candidates", "2", "--reward_heads", '[{"name": "lenght"}]'], {}, "Did you mean 'length'"),
        (["rank", "--model", "MODEL", "--num_candidates", "2", "--reward_heads", "[{name"], {}, "--reward_heads must be JSON"),
        (["rank", "--candidates_column", "c", "--reward_heads", HEADS, "--temperature", "0.5"], {}, r"Generation options \['temperature'\] were given without --model"),
        (["critique", "--model", "MODEL", "--critique_template", "Critique: {response}"], {}, r"missing placeholder\(s\) \['\{critique_request\}', '\{prompt\}'\]"),
        (["critique", "--model", "MODEL", "--prompt_column", "question"], {}, "no prompt column 'question'"),
        (["critique"], {}, "--model is required"),
    ],
)
def test_errors_exit_2_before_generation(tiny_model_path, tmp_path, capsys, no_generation, args, yaml_data, match):
    args = [tiny_model_path if a == "MODEL" else a for a in args]
    base = {"dataset": _prompt_file(tmp_path), "output": str(tmp_path / "out.jsonl")}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(base | yaml_data))
    assert trl_upo(["build-pairs", *args, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-upo build-pairs: error:")
    assert re.search(match, err), err
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_output_and_existing_output(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "a": " x", "b": " x y"}])
    common = ["build-pairs", "rank", "--dataset", data, "--candidate_columns", "a", "b", "--reward_heads",
              '[{"name": "length"}]', "--no-progress"]
    assert trl_upo(common) == 2
    assert "--output is required" in capsys.readouterr().err
    out = str(tmp_path / "o.jsonl")
    assert trl_upo([*common, "--output", out]) == 0
    assert trl_upo([*common, "--output", out]) == 2
    assert "already exists" in capsys.readouterr().err
    assert trl_upo([*common, "--output", out, "--overwrite"]) == 0


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_file(tiny_model_path, tmp_path):
    """SIGKILL a real `trl-upo build-pairs rank` process after its first shards, run it again: same bytes as an
    uninterrupted run."""
    prompts = _prompt_file(tmp_path, 24)

    def cmd(out):
        return [sys.executable, "-m", "trl_upo.cli", "build-pairs", "rank", "--dataset", prompts, "--model",
                tiny_model_path, "--num_candidates", "3", "--max_new_tokens", "24", "--reward_heads",
                '[{"name": "length"}, {"name": "novery", "type": "lexicon", "params": {"avoid": ["very"]}}]',
                "--batch_size", "2", "--seed", "7", "--keep_candidates", "--output", str(out), "--no-progress"]

    # One thread: a batch takes about as long on idle and on busy cores, so the kill lands mid-run either way.
    env = os.environ | {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full.jsonl"
    subprocess.run(cmd(full), check=True, env=env, capture_output=True)
    part = tmp_path / "part.jsonl"
    shards = tmp_path / "part.jsonl.shards"
    proc = subprocess.Popen(cmd(part), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("shard-*.jsonl"))) < 3:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(shards.glob("shard-*.jsonl")))
    assert 3 <= done < 12 and not part.exists(), done
    subprocess.run(cmd(part), check=True, env=env, capture_output=True)
    assert part.read_bytes() == full.read_bytes()


def test_help_and_argparse_errors_return_codes(capsys):
    assert trl_upo(["build-pairs", "--help"]) == 0
    assert "{rank,critique}" in capsys.readouterr().out
    assert trl_upo(["build-pairs", "rank", "--help"]) == 0
    assert "--candidate_columns" in capsys.readouterr().out
    assert trl_upo(["build-pairs", "rank", "--pairing", "best"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_the_docs_yaml_config_parses(tmp_path):
    """The build-pairs YAML on docs/data.md uses only valid keys and builds a valid critique config."""
    from pathlib import Path

    from trl_upo.cli.build_pairs import _critique_config, parse_args

    page = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    block = re.search(r"```yaml\n(# build-pairs\.yaml.*?)```", page, re.S).group(1)
    config = tmp_path / "build-pairs.yaml"
    config.write_text(block)
    args = parse_args(["--config", str(config)], "trl-upo build-pairs")
    assert args.method == "critique" and args.max_new_tokens == 256 and args.batch_size == 16
    assert _critique_config(args).principle_list[0].name == "concise"


def test_push_to_hub_is_called_with_the_built_dataset(tmp_path, monkeypatch, capsys):
    """The Hub itself is offline here: record the call datasets would make."""
    from datasets import Dataset

    pushed = []
    monkeypatch.setattr(Dataset, "push_to_hub", lambda self, repo, **kw: pushed.append((repo, kw, self.to_list())))
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "a": " x", "b": " x y"}])
    code = trl_upo(["build-pairs", "rank", "--dataset", data, "--candidate_columns", "a", "b", "--reward_heads",
                    '[{"name": "length"}]', "--no-progress", "--output", str(tmp_path / "o.jsonl"),
                    "--push_to_hub", "me/pairs", "--hub_private"])
    assert code == 0
    assert pushed == [("me/pairs", {"private": True}, _read_jsonl(tmp_path / "o.jsonl"))]


def test_rerank_packaged_quickstart_data_with_upo_paths(tmp_path, caplog):
    """`upo://` names packaged assets; re-ranking an existing dataset's two responses keeps the pairs a head
    separates (with its winner as chosen) and reports the prompts it cannot rank."""
    from trl_upo.resources import resolve_resource

    source = _read_jsonl(resolve_resource("upo://quickstart-data/train.jsonl"))[:16]
    out = tmp_path / "reranked.jsonl"
    code = trl_upo(["build-pairs", "rank", "--dataset", "upo://quickstart-data/train.jsonl", "--limit", "16",
                    "--candidate_columns", "chosen", "rejected", "--reward_heads",
                    '[{"name": "novery", "type": "lexicon", "params": {"avoid": ["very"]}}]',
                    "--output", str(out), "--no-progress"])
    assert code == 0
    has = [[" very " in f"{r[c]} " for c in ("chosen", "rejected")] for r in source]
    expected = [
        (r["rejected"], r["chosen"]) if c else (r["chosen"], r["rejected"])
        for r, (c, rj) in zip(source, has, strict=True)
        if c != rj
    ]
    rows = _read_jsonl(out)
    assert [(r["chosen"], r["rejected"]) for r in rows] == expected
    ties = sum(c == rj for c, rj in has)
    assert f"{ties} of the 16 prompts ranked in this run gave no pair" in caplog.text
    assert trl_upo(["build-pairs", "rank", "--dataset", "upo://no-such-data.jsonl", "--candidate_columns", "a", "b",
                    "--reward_heads", '[{"name": "length"}]', "--output", str(tmp_path / "x.jsonl")]) == 2


def test_remove_columns_gives_an_existing_preference_dataset_new_pairs(tiny_model_path, tmp_path, capsys):
    common = ["build-pairs", "critique", "--dataset", "upo://quickstart-data/test.jsonl", "--limit", "2", "--model",
              tiny_model_path, "--max_new_tokens", "3", "--output", str(tmp_path / "c.jsonl"), "--no-progress"]
    assert trl_upo(common) == 2
    assert "['chosen', 'rejected'], which the output would overwrite" in capsys.readouterr().err
    assert trl_upo([*common, "--remove_columns", "chosen", "rejectd"]) == 2
    assert "remove_columns names ['rejectd']" in capsys.readouterr().err
    assert trl_upo([*common, "--remove_columns", "chosen", "rejected"]) == 0
    assert len(_read_jsonl(tmp_path / "c.jsonl")) == 2


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import trl_upo.data.io as data_io

    real = data_io.ShardStore.write

    def write_then_interrupt(self, index, rows):
        real(self, index, rows)
        if index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(data_io.ShardStore, "write", write_then_interrupt)
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "a": " x", "b": " x y"} for i in range(5)])
    cmd = ["build-pairs", "rank", "--dataset", data, "--candidate_columns", "a", "b", "--reward_heads",
           '[{"name": "length"}]', "--batch_size", "2", "--no-progress", "--output", str(tmp_path / "o.jsonl")]
    assert trl_upo(cmd) == 130
    assert f"2 finished batch(es) are saved in {tmp_path / 'o.jsonl.shards'}" in capsys.readouterr().err
    monkeypatch.setattr(data_io.ShardStore, "write", real)
    assert trl_upo(cmd) == 0
    assert len(_read_jsonl(tmp_path / "o.jsonl")) == 5


def test_rank_unpaired_writes_desirable_and_undesirable_rows_and_kto_column_heads(tmp_path, capsys):
    """--unpaired: each best-vs-worst pair becomes a desirable row (the best answer) and an undesirable row (the
    worst), scores per completion; the printed column heads read those scores on unpaired rows (UPOKTOConfig)."""
    from trl_upo import UPOKTOConfig
    from trl_upo.heads import build_head, parse_head_specs

    data = _write_jsonl(tmp_path / "cands.jsonl", [
        {"prompt": "p0", "c": [" a very b", " a", " very very"]},
        {"prompt": "p1", "c": [" x y z", " very"]},
    ])
    out = tmp_path / "kto.jsonl"
    heads = '[{"name": "novery", "type": "lexicon", "params": {"avoid": ["very"]}}]'
    assert trl_upo(["build-pairs", "rank", "--dataset", data, "--candidates_column", "c", "--reward_heads", heads,
                    "--unpaired", "--no-progress", "--output", str(out)]) == 0
    rows = _read_jsonl(out)
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ("p0", " a", True), ("p0", " very very", False), ("p1", " x y z", True), ("p1", " very", False)]
    assert [r["score_novery_completion"] for r in rows] == [0.0, -2.0, 0.0, -1.0]
    assert not any(k in r for r in rows for k in ("chosen", "rejected", "score_novery_chosen"))
    printed = capsys.readouterr().out
    assert "Wrote 4 unpaired rows (2 desirable, 2 undesirable) from 2 prompts" in printed
    snippet = yaml.safe_load(printed[printed.index("reward_heads:"):])
    assert snippet["reward_heads"][0]["params"] == {"completion": "score_novery_completion"}
    UPOKTOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False, **snippet)
    (spec,) = parse_head_specs(snippet["reward_heads"])
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    assert build_head(spec).score([], [], role="completion", columns=columns) == [0.0, -2.0, 0.0, -1.0]


def test_critique_unpaired_revision_desirable_first_answer_undesirable(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "c"
    assert trl_upo(["build-pairs", "critique", "--dataset", _prompt_file(tmp_path, 2), "--model", tiny_model_path,
                    "--max_new_tokens", "4", "--unpaired", "--no-progress", "--format", "disk",
                    "--output", str(out)]) == 0
    from datasets import load_from_disk

    ds = load_from_disk(str(out))
    assert ds["label"] == [True, False, True, False]
    assert {"prompt", "completion", "label", "critique", "principle"} <= set(ds.column_names)
    assert "chosen" not in ds.column_names and ds["prompt"][0] == ds["prompt"][1]
    assert "Wrote 4 unpaired rows (2 desirable, 2 undesirable) from 2 prompts" in capsys.readouterr().out


def test_unpaired_output_refuses_input_columns_it_would_overwrite(tmp_path, capsys, no_generation):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "c": [" a", " b"], "label": 1}])
    rc = trl_upo(["build-pairs", "rank", "--dataset", data, "--candidates_column", "c", "--reward_heads", HEADS,
                  "--unpaired", "--output", str(tmp_path / "o.jsonl")])
    assert rc == 2
    assert "has column(s) ['label'], which the output would overwrite" in capsys.readouterr().err


def test_cli_doc_unpaired_commands(tmp_path, monkeypatch, capsys):
    """docs/cli.md's `shell` blocks of build-pairs and eval, in page order: a line on packaged assets runs and prints
    what the page shows (a Hub model is only parsed); eval reads the unpaired rows build-pairs wrote."""
    import shlex
    from pathlib import Path

    from trl_upo.cli.build_pairs import parse_args

    page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    lines = [shlex.split(line) for block in re.findall(r"```shell\n(.*?)```", page, re.S)
             for line in block.splitlines() if line.strip()]
    texts = re.findall(r"```text\n(.*?)```", page, re.S)
    monkeypatch.chdir(tmp_path)
    ran = []
    for cmd in lines:
        assert cmd[0] == "trl-upo" and cmd[1] in ("build-pairs", "eval"), cmd
        if cmd[1] == "build-pairs" and "--model" in cmd and not cmd[cmd.index("--model") + 1].startswith("upo://"):
            assert parse_args(cmd[2:], "trl-upo build-pairs").unpaired is True
            continue
        capsys.readouterr()
        assert trl_upo(cmd[1:]) == 0, cmd
        out = capsys.readouterr().out
        marker = "Wrote 8 unpaired rows" if cmd[1] == "build-pairs" else "unpaired accuracy"
        (shown,) = [t for t in texts if marker in t]
        ran.append(cmd[1])
        if cmd[1] == "build-pairs":  # the page shows the warning (logged) above what is printed
            assert out.splitlines() == shown.splitlines()[1:] and "gave no pair" in shown.splitlines()[0]
            rows = _read_jsonl(tmp_path / "unpaired.jsonl")
            assert [r["label"] for r in rows] == [True, False] * 4
        else:  # the unpaired rows of the table: the tiny model against itself ties everywhere
            wanted = [line for line in shown.splitlines() if line.startswith("unpaired")]
            assert len(wanted) == 2 and all(line in out.splitlines() for line in wanted)
            assert json.loads((tmp_path / "eval-unpaired" / "eval.json").read_text())["unpaired"]["accuracy"] == 0.5
    assert ran == ["build-pairs", "eval"]
