"""Model heads and custom model code: ``trust_remote_code`` is a head parameter (false by default), recorded in the
head's spec, never in its fingerprint; without it a model with custom code is refused with the parameter to set."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from trl_upo.heads import build_head, registered_heads
from trl_upo.heads.spec import HeadSpec

MODEL_CODE = """from transformers import AutoModel, LlamaConfig, LlamaForSequenceClassification, LlamaModel


class CustomConfig(LlamaConfig):
    model_type = "upo_custom_llama"


class CustomModel(LlamaModel):
    config_class = CustomConfig


AutoModel.register(CustomConfig, CustomModel, exist_ok=True)  # the base model the classification head builds


class CustomForSequenceClassification(LlamaForSequenceClassification):
    config_class = CustomConfig
"""


@pytest.fixture(scope="module")
def custom_code_model(tmp_path_factory, tiny_reward_model_path) -> str:
    """A tiny one-label classifier whose config names its own code (``auto_map``), as Hub models with custom
    architectures do: transformers loads it only with ``trust_remote_code=True``."""
    path = str(tmp_path_factory.mktemp("custom") / "rm")
    shutil.copytree(tiny_reward_model_path, path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["model_type"] = "upo_custom_llama"
    config["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig",
                          "AutoModelForSequenceClassification": "modeling_custom.CustomForSequenceClassification"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "modeling_custom.py"), "w") as f:
        f.write(MODEL_CODE)
    return path


@pytest.fixture(autouse=True)
def _modules_cache(tmp_path, monkeypatch):
    """transformers copies a model's code into its modules cache: keep that copy inside the test's directory."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))


def _head(model: str, **params):
    return build_head(HeadSpec(name="rm", type="reward_model", params={"model": model, **params}))


def test_custom_code_refused_with_the_head_parameter_to_set(custom_code_model):
    head = _head(custom_code_model)
    with pytest.raises(ValueError, match=r"reward_model head: .* has custom code.*set `trust_remote_code: true` in the "
                                         r"head's params.*docs/trust.md") as info:
        head.load()
    assert "policy's own `trust_remote_code` does not apply" in str(info.value)


def test_trust_remote_code_loads_and_scores(custom_code_model):
    head = _head(custom_code_model, trust_remote_code=True)
    scores = head.score(["tell me", "tell me"], [" a cat", " a very long answer about cats"], role="chosen", columns={})
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert type(head.load()[0]).__name__ == "CustomForSequenceClassification"  # the model's own class ran


def test_trust_remote_code_is_in_the_spec_not_the_fingerprint(custom_code_model):
    trusted, plain = _head(custom_code_model, trust_remote_code=True), _head(custom_code_model)
    assert trusted.config()["trust_remote_code"] is True  # what the recipe allowed is recorded with the head
    assert "trust_remote_code" not in trusted.semantic_config()
    assert trusted.fingerprint() == plain.fingerprint()  # the code that runs is in the model's content digest


@pytest.mark.parametrize("kind", ["reward_model", "classifier", "similarity"])
def test_every_model_head_takes_the_parameter(kind):
    cls = registered_heads()[kind]
    params = {"model": "org/model", "trust_remote_code": "yes"}
    params.update({"labels": "x"} if kind == "classifier" else {"exemplars": ["a"]} if kind == "similarity" else {})
    with pytest.raises(ValueError, match="trust_remote_code"):
        cls.validate_params(params)
        cls(**params)
    params["trust_remote_code"] = True
    cls.validate_params(params)
    assert cls(**params).trust_remote_code is True
