"""The ``classifier`` head against a manual forward of a tiny saved LlamaForSequenceClassification
(labels negative / neutral / positive; see the ``tiny_classifier_path`` fixture)."""

from __future__ import annotations

import functools
import os
import pickle
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trl_upo.heads import ClassifierHead, HeadSpec, build_head
from tests.tiny import save_tiny_classifier

TEXTS = ["cats purr", "dogs bark very loud", "rain", "the soup is very good and they like bread"]
PROMPTS = ["tell me about cats", "tell me about dogs", "tell me about rain", "tell me about food"]


@pytest.fixture(scope="module")
def manual(tiny_classifier_path):
    """Logits of each text (or text pair) on its own: no padding, so this also checks the head's batching."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_path).eval()
    tok = AutoTokenizer.from_pretrained(tiny_classifier_path)

    def run(*args):
        with torch.no_grad():
            return model(**tok(*args, return_tensors="pt")).logits[0]

    return run


def _head(path, **params):
    return build_head(HeadSpec("classifier", "classifier", params={"model": path, "device": "cpu", **params}))


def _score(head, texts=TEXTS, prompts=PROMPTS):
    return head.score(prompts[: len(texts)], texts, role="chosen", columns={})


def test_probability_of_one_label_matches_manual_forward(tiny_classifier_path, manual):
    expected = [torch.softmax(manual(t), -1)[2].item() for t in TEXTS]
    got = _score(_head(tiny_classifier_path, labels="positive", batch_size=3))
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(got)) == len(got)  # the texts really are told apart
    # a label index is the same label; a unique case-insensitive spelling too
    assert _score(_head(tiny_classifier_path, labels=2)) == pytest.approx(expected, abs=1e-5)
    assert _score(_head(tiny_classifier_path, labels="POSITIVE")) == pytest.approx(expected, abs=1e-5)


def test_several_labels_are_summed_and_logits(tiny_classifier_path, manual):
    probs = [torch.softmax(manual(t), -1) for t in TEXTS]
    got = _score(_head(tiny_classifier_path, labels=["negative", 1]))
    assert got == pytest.approx([(p[0] + p[1]).item() for p in probs], abs=1e-5)
    # all labels sum to 1
    assert _score(_head(tiny_classifier_path, labels=[0, 1, 2])) == pytest.approx([1.0] * 4, abs=1e-6)
    logits = _score(_head(tiny_classifier_path, labels=["neutral"], output="logit"))
    assert logits == pytest.approx([manual(t)[1].item() for t in TEXTS], abs=1e-5)


def test_include_prompt_classifies_the_pair(tiny_classifier_path, manual):
    expected = [torch.softmax(manual(p, t), -1)[2].item() for p, t in zip(PROMPTS, TEXTS)]
    got = _score(_head(tiny_classifier_path, labels="positive", include_prompt=True))
    assert got == pytest.approx(expected, abs=1e-5)
    assert got != pytest.approx(_score(_head(tiny_classifier_path, labels="positive")), abs=1e-5)


def test_single_label_model_uses_a_sigmoid(tiny_reward_model_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_path).eval()
    tok = AutoTokenizer.from_pretrained(tiny_reward_model_path)
    with torch.no_grad():
        expected = [torch.sigmoid(model(**tok(t, return_tensors="pt")).logits[0, 0]).item() for t in TEXTS]
    assert _score(_head(tiny_reward_model_path, labels=0)) == pytest.approx(expected, abs=1e-5)


def test_truncation(tiny_classifier_path, manual):
    """max_length 2 keeps the first two tokens of the response (the tiny tokenizer adds no special tokens)."""
    got = _score(_head(tiny_classifier_path, labels="positive", max_length=2), texts=[TEXTS[3]])
    assert got == pytest.approx([torch.softmax(manual("the soup"), -1)[2].item()], abs=1e-5)


def test_empty_response_is_finite(tiny_classifier_path):
    got = _score(_head(tiny_classifier_path, labels="positive"), texts=["", "cats"])
    assert all(0.0 < v < 1.0 for v in got), got
    assert _score(_head(tiny_classifier_path, labels="positive"), texts=[""]) == pytest.approx(got[:1], abs=1e-5)


def test_lazy_loading_and_pickling(tiny_classifier_path, tmp_path):
    from tests.helpers import cpu_args

    # building a config never loads the model; building the head (in the trainer, before any training) checks
    # that a local path exists; an existing folder that holds no model fails when the head first scores
    cfg = cpu_args(tmp_path / "out", reward_heads=[{"name": "classifier", "params": {
        "model": str(tmp_path / "not-there"), "labels": "toxic"}}])
    with pytest.raises(ValueError, match="not-there' does not exist"):
        build_head(cfg.head_specs[0])
    (tmp_path / "empty").mkdir()
    head = _head(str(tmp_path / "empty"), labels="toxic")
    assert head._model is None
    with pytest.raises(ValueError, match="cannot load .*empty"):
        _score(head)

    head = _head(tiny_classifier_path, labels="positive")
    assert head._model is None
    before = _score(head)
    assert head._model is not None
    blob = pickle.dumps(head)
    assert len(blob) < 10_000  # the weights are not in the pickle
    clone = pickle.loads(blob)
    assert clone._model is None and _score(clone) == before
    head.release()
    assert head._model is None and _score(head) == before


def test_fingerprint_follows_the_model_content_not_its_path_or_file_times(tmp_path):
    path = save_tiny_classifier(str(tmp_path / "m"), labels=["a", "b"], seed=0)
    fp = ClassifierHead(model=path, labels="a").fingerprint()
    assert "sha256:" in fp and path not in fp
    assert ClassifierHead(model=path, labels="b").fingerprint() != fp
    # Touching every file (new modification times, same bytes) keeps the fingerprint.
    for name in os.listdir(path):
        st = os.stat(os.path.join(path, name))
        os.utime(os.path.join(path, name), ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))
    assert ClassifierHead(model=path, labels="a").fingerprint() == fp
    # The same files in another directory: the same model, the same fingerprint.
    copy = shutil.copytree(path, tmp_path / "copy")
    assert ClassifierHead(model=str(copy), labels="a").fingerprint() == fp
    # Speed-only settings do not change it.
    assert ClassifierHead(model=path, labels="a", batch_size=3, device="cpu").fingerprint() == fp
    save_tiny_classifier(path, labels=["a", "b"], seed=1)  # same path, new weights
    assert ClassifierHead(model=path, labels="a").fingerprint() != fp


def test_file_hashes_are_reused_until_a_file_is_touched(tmp_path, monkeypatch):
    from trl_upo.heads import _hf

    path = save_tiny_classifier(str(tmp_path / "m"), labels=["a", "b"], seed=0)
    reads = []
    real_open = open

    def counting_open(file, mode="r", *args, **kwargs):
        if "b" in mode and "r" in mode and str(file).startswith(path):
            reads.append(os.path.basename(str(file)))
        return real_open(file, mode, *args, **kwargs)

    ClassifierHead(model=path, labels="a").fingerprint()
    monkeypatch.setattr("builtins.open", counting_open)
    ClassifierHead(model=path, labels="a").fingerprint()
    assert reads == []  # nothing re-read: (path, size, mtime) unchanged
    weights = next(n for n in os.listdir(path) if n.endswith(".safetensors"))
    os.utime(os.path.join(path, weights))
    ClassifierHead(model=path, labels="a").fingerprint()
    assert reads == [weights]
    assert _hf.model_identity("org/not-downloaded", "v1") == "org/not-downloaded@v1"


def _wrap_forward(model, before) -> None:
    """Call ``before(input_ids)`` ahead of each forward of ``model`` (it may raise, as a GPU out of memory does)."""
    forward = model.forward

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        before(kwargs["input_ids"])
        return forward(*args, **kwargs)

    model.forward = wrapped


def test_batches_are_sorted_by_length_and_scores_keep_their_order(tiny_classifier_path, manual):
    head = _head(tiny_classifier_path, labels="positive", output="logit", batch_size=2)
    model, _ = head.load()
    sizes = []
    _wrap_forward(model, lambda ids: sizes.append(tuple(ids.shape)))
    texts = ["a", "the soup is very good and they like bread", "dogs bark", "rain falls on the very big city"]
    got = head.score(["p"] * 4, texts, role="chosen", columns={})
    assert [s[1] for s in sizes] == sorted((s[1] for s in sizes), reverse=True)  # longest batch first
    for value, text in zip(got, texts, strict=True):
        assert value == pytest.approx(manual(text)[2].item(), abs=1e-5)


def test_cuda_out_of_memory_halves_the_batch_size_and_goes_on(tiny_classifier_path, manual, caplog):
    head = _head(tiny_classifier_path, labels="positive", output="logit", batch_size=8)
    model, _ = head.load()
    sizes = []

    def small_gpu(ids):
        sizes.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _wrap_forward(model, small_gpu)
    texts = TEXTS + ["one more", "and another one"]
    with caplog.at_level("WARNING", logger="trl_upo.heads._hf"):
        got = head.score(["p"] * len(texts), texts, role="chosen", columns={})
    assert sizes[:3] == [6, 4, 2] and set(sizes[3:]) <= {2}
    assert sum(s for s in sizes if s <= 2) == len(texts)
    assert [value for value in got] == pytest.approx([manual(t)[2].item() for t in texts], abs=1e-5)
    assert "batch size 6; going on with batch size 4" in caplog.text
    assert "batch size 4; going on with batch size 2" in caplog.text
    assert "going on with batch size 1" not in caplog.text
    head.score(["p"], ["x"], role="chosen", columns={})
    assert sizes[-1] == 1 and head._current_batch_size() == 2  # the smaller batch size is kept


def test_cuda_out_of_memory_on_one_input_is_raised(tiny_classifier_path):
    head = _head(tiny_classifier_path, labels="positive", batch_size=4)
    model, _ = head.load()

    @functools.wraps(model.forward)
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    model.forward = no_memory
    with pytest.raises(torch.cuda.OutOfMemoryError, match="single input .* lower max_length|single input"):
        head.score(["p", "q"], ["a", "b"], role="chosen", columns={})


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        ("toxic", r"label 'toxic' is not one of the labels .*\['negative', 'neutral', 'positive'\]"),
        (3, r"label index 3 is out of range .* 3 label\(s\)"),
        (["positive", 2], "name the same label twice"),
    ],
)
def test_missing_label_errors(tiny_classifier_path, labels, pattern):
    with pytest.raises(ValueError, match=pattern):
        _score(_head(tiny_classifier_path, labels=labels))


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({"labels": []}, "labels must be a label name"),
        ({"labels": "x", "output": "prob"}, "output must be one of"),
        ({"labels": "x", "batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"labels": "x", "dtype": "fp16"}, "dtype must be one of"),
        ({"labels": "x", "model": ""}, "model must be a local path or a Hugging Face Hub model id"),
    ],
)
def test_bad_params(params, pattern):
    with pytest.raises(ValueError, match=pattern):
        ClassifierHead(**{"model": "some/model", **params})


def test_default_device_is_the_process_gpu(monkeypatch):
    """Without ``device``, each process uses its current CUDA device (set per rank by accelerate), not cuda:0."""
    from trl_upo import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.default_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert models.default_device() == "cuda:3"
    assert ClassifierHead(model="m", labels="x")._device() == "cuda:3"
    assert ClassifierHead(model="m", labels="x", device="cpu")._device() == "cpu"


@pytest.mark.gpu
def test_on_cuda_in_bfloat16_the_scores_follow_float32_on_the_cpu(tiny_classifier_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu = _head(tiny_classifier_path, labels="positive", output="logit")
    gpu = _head(tiny_classifier_path, labels="positive", output="logit", device="cuda", dtype="bfloat16",
                batch_size=1024)
    assert gpu.fingerprint() != cpu.fingerprint()  # dtype decides scores; device does not
    texts = TEXTS * 64
    assert _score(gpu, texts, PROMPTS * 64) == pytest.approx(_score(cpu, texts, PROMPTS * 64), abs=0.05)
