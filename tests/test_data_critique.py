"""Self-critique revisions (``trl_upo.data.critique``): templates and principles checked up front, the three
generation stages with a real tiny model, standard and conversational output that trains UPOTrainer, resume."""

from __future__ import annotations

import pytest
from datasets import Dataset

from trl_upo import UPOTrainer
from trl_upo.data import (
    DEFAULT_CRITIQUE_TEMPLATE,
    DEFAULT_PRINCIPLES,
    DEFAULT_REVISION_TEMPLATE,
    CritiqueConfig,
    GenerationSettings,
    OutputSettings,
    build_critique_pairs,
    check_template,
)
from trl_upo.data.generation import TransformersGenerator

from tests.helpers import cpu_args, prompt_dataset as _prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TWO_PRINCIPLES = [
    {"name": "short", "critique_request": "say what is long", "revision_request": "rewrite it short"},
    {"name": "kind", "critique_request": "say what is unkind", "revision_request": "rewrite it kind"},
]




def _cfg(model: str, **kw) -> CritiqueConfig:
    return CritiqueConfig(generation=GenerationSettings(model=model, max_new_tokens=5), **kw)


class Recorder:
    """Wraps TransformersGenerator.generate to record every call's prompts."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[list, int]] = []
        real = TransformersGenerator.generate

        def generate(gen, prompts, n, seed):
            self.calls.append((list(prompts), seed))
            return real(gen, prompts, n, seed)

        monkeypatch.setattr(TransformersGenerator, "generate", generate)


# ---------------------------------------------------------------------------------------------------------------
# Templates and principles
# ---------------------------------------------------------------------------------------------------------------


def test_default_templates_and_principle_are_the_seed_example():
    check_template("critique_template", DEFAULT_CRITIQUE_TEMPLATE)
    check_template("revision_template", DEFAULT_REVISION_TEMPLATE)
    (p,) = DEFAULT_PRINCIPLES
    assert p.critique_request.startswith("Identify specific ways in which the assistant's last response is harmful")
    assert p.revision_request.startswith("Please rewrite the assistant response to remove any and all harmful")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(critique_template="Critique {response}:"), r"critique_template is missing placeholder\(s\) \['\{critique_request\}', '\{prompt\}'\]"),
        (dict(revision_template="{prompt} {response} {revision_request}"), r"missing placeholder\(s\) \['\{critique\}'\]"),
        (dict(critique_template="{prompt} {respons} {critique_request}"), r"unknown placeholder.*\{respons\} \(did you mean \{response\}\?\)"),
        (dict(critique_template="{prompt} {response} {critique_request} {"), "not a valid format string"),
        (dict(critique_template="{prompt} {response} {critique_request} {0}"), "not plain names"),
        (dict(principles=[{"name": "x", "critique_request": "c"}]), r"missing \['revision_request'\]"),
        (dict(principles=[{"name": "x", "critique": "c", "revision_request": "r"}]), "did you mean 'critique_request'"),
        (dict(principles=[{"name": "x", "critique_request": " ", "revision_request": "r"}]), "non-empty string"),
        (dict(principles=TWO_PRINCIPLES[:1] * 2), "unique"),
        (dict(principles="[not json"), "could not parse"),
        (dict(principle_selection="each"), "principle_selection must be one of"),
    ],
)
def test_bad_templates_and_principles(tiny_model_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tiny_model_path, **kwargs)


def test_critique_needs_a_model():
    with pytest.raises(ValueError, match="needs a model"):
        CritiqueConfig()


@pytest.mark.parametrize(
    "rows, kwargs, match",
    [
        ([{"text": "x"}], {}, "no prompt column 'prompt'"),
        ([{"prompt": "x"}], dict(response_column="answer"), "no response column 'answer'"),
        ([{"prompt": "x", "answer": 3}], dict(response_column="answer"), "must hold a string"),
        ([{"prompt": "x", "critique": "old"}], {}, r"\['critique'\], which the output would overwrite"),
        ([{"prompt": 5}], {}, "must be a string"),
    ],
)
def test_bad_input_fails_before_generation(tiny_model_path, no_generation, rows, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_critique_pairs(Dataset.from_list(rows), _cfg(tiny_model_path, **kwargs))


# ---------------------------------------------------------------------------------------------------------------
# End to end with the tiny model
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tiny_model_path, tmp_path_factory):
    """An uninterrupted standard run: 4 prompts in 2 batches, two principles. Returns (output path, dataset, the
    prompts of every generate call)."""
    mp = pytest.MonkeyPatch()
    try:
        rec = Recorder(mp)
        path = tmp_path_factory.mktemp("critique-full") / "full.jsonl"
        out = build_critique_pairs(_prompts(4), _full_cfg(tiny_model_path), OutputSettings(str(path), progress=False))
    finally:
        mp.undo()
    return path, out, rec.calls


def _full_cfg(model: str) -> CritiqueConfig:
    return _cfg(model, principles=TWO_PRINCIPLES, batch_size=2, seed=5)


def test_critique_standard_end_to_end_trains_upo(tiny_model_path, full_run, tmp_path, score_cache):
    path, out, calls = full_run
    assert out.column_names == ["prompt", "chosen", "rejected", "critique", "principle", "id"]
    assert len(out) == 4 and out["id"] == [0, 1, 2, 3]
    # Three stages per batch, one batched call each: answers to the prompts, critiques, revisions.
    assert len(calls) == 6
    answers_in = calls[0][0] + calls[3][0]
    critique_in = calls[1][0] + calls[4][0]
    revision_in = calls[2][0] + calls[5][0]
    assert answers_in == out["prompt"]
    for row, c_in, r_in in zip(out, critique_in, revision_in, strict=True):
        principle = next(p for p in TWO_PRINCIPLES if p["name"] == row["principle"])
        assert c_in == DEFAULT_CRITIQUE_TEMPLATE.format(
            prompt=row["prompt"], response=row["rejected"].strip(), critique_request=principle["critique_request"]
        )
        assert r_in == DEFAULT_REVISION_TEMPLATE.format(
            prompt=row["prompt"], response=row["rejected"].strip(), critique=row["critique"],
            critique_request=principle["critique_request"], revision_request=principle["revision_request"],
        )
        # A standard completion keeps its separator from the prompt (a leading space, as the model wrote it).
        assert row["rejected"].startswith(" ") and row["chosen"].startswith(" ")
    assert set(out["principle"]) <= {"short", "kind"}
    train = Dataset.from_json(str(path))
    args = cpu_args(tmp_path / "run", reward_heads=[{"name": "length"}], upo_score_cache_dir=score_cache, max_steps=2)
    trainer = UPOTrainer(model=tiny_model_path, args=args, train_dataset=train)
    trainer.train()
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 2


def test_critique_conversational_all_principles_existing_answers(tiny_model_path, tmp_path, score_cache, monkeypatch):
    rec = Recorder(monkeypatch)
    ds = _prompts(2, conversational=True).add_column("answer", ["cats purr", "dogs bark"])
    cfg = _cfg(tiny_model_path, principles=TWO_PRINCIPLES, principle_selection="all", response_column="answer")
    out = build_critique_pairs(ds, cfg, OutputSettings(str(tmp_path / "conv"), progress=False))
    assert len(out) == 4 and out["principle"] == ["short", "kind", "short", "kind"]
    assert len(rec.calls) == 2  # the answers exist: only critique and revision are generated
    critique_in = rec.calls[0][0]
    # A filled template goes to the model as one user message, rendered by its chat template.
    assert critique_in[0] == [
        {"role": "user", "content": DEFAULT_CRITIQUE_TEMPLATE.format(
            prompt="tell me about cats", response="cats purr", critique_request=TWO_PRINCIPLES[0]["critique_request"])}
    ]
    for row in out:
        assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
    assert out["rejected"][0] == [{"role": "assistant", "content": "cats purr"}]
    from datasets import load_from_disk

    args = cpu_args(tmp_path / "run", upo_score_cache_dir=score_cache, max_steps=2, per_device_train_batch_size=2,
                    reward_heads=[{"name": "novery", "type": "lexicon", "params": {"avoid": ["very"]}}])
    UPOTrainer(model=tiny_model_path, args=args, train_dataset=load_from_disk(str(tmp_path / "conv"))).train()


class Interrupt(Exception):
    pass


def test_interrupted_critique_resumes_to_the_same_dataset(tiny_model_path, full_run, tmp_path, monkeypatch):
    def stop(b):
        raise Interrupt

    part = tmp_path / "part.jsonl"
    with pytest.raises(Interrupt):
        build_critique_pairs(_prompts(4), _full_cfg(tiny_model_path), OutputSettings(str(part), progress=False),
                             on_batch=stop)
    rec = Recorder(monkeypatch)
    build_critique_pairs(_prompts(4), _full_cfg(tiny_model_path), OutputSettings(str(part), progress=False))
    assert len(rec.calls) == 3  # one batch left: answer, critique, revision
    assert part.read_bytes() == full_run[0].read_bytes()


def test_two_revision_rounds_revise_the_revision(tiny_model_path, monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = _cfg(tiny_model_path, principles=TWO_PRINCIPLES, num_revisions=2, seed=1)
    out = build_critique_pairs(_prompts(2), cfg)
    assert len(rec.calls) == 5  # answers, then critique + revision per round
    row = out[0]
    rounds = row["revisions"]
    assert len(rounds) == 2 and [r["principle"] for r in rounds] == [p.name for p in cfg.principles_for(0)[0]]
    # Round 2 critiques round 1's revision; the pair's chosen is the last revision, its critique the last critique.
    principle2 = next(p for p in TWO_PRINCIPLES if p["name"] == rounds[1]["principle"])
    assert rec.calls[3][0][0] == DEFAULT_CRITIQUE_TEMPLATE.format(
        prompt=row["prompt"], response=rounds[0]["revision"], critique_request=principle2["critique_request"]
    )
    assert row["chosen"].strip() == rounds[1]["revision"] and row["critique"] == rounds[1]["critique"]
    assert row["principle"] == rounds[1]["principle"]
    with pytest.raises(ValueError, match="num_revisions must be an integer >= 1"):
        _cfg(tiny_model_path, num_revisions=0)


def test_stop_strings_cut_responses(tiny_model_path):
    """A base model prompted with the Human/Assistant templates would write the next turn: `stop` cuts it off."""
    from trl_upo.data import make_generator

    settings = GenerationSettings(model=tiny_model_path, max_new_tokens=12)
    full = make_generator(settings).generate(["tell me about cats answer"] * 3, 2, seed=0)
    words = [t.split()[1] for ts in full for t in ts if len(t.split()) > 2]
    stop = " " + words[0]  # a word the model does write: cut before its first occurrence
    cut = make_generator(GenerationSettings(model=tiny_model_path, max_new_tokens=12, stop=[stop])).generate(
        ["tell me about cats answer"] * 3, 2, seed=0
    )
    for ts_full, ts_cut in zip(full, cut, strict=True):
        for a, b in zip(ts_full, ts_cut, strict=True):
            assert b == (a[: a.find(stop)] if stop in a else a)
    assert any(stop in a for ts in full for a in ts) and not any(stop in b for ts in cut for b in ts)
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
        GenerationSettings(model=tiny_model_path, stop=[""])
