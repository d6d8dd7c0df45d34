"""QLoRA: a 4-bit (nf4) base model through bitsandbytes on CPU, a LoRA adapter, and the UPO term."""

import math

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="the quantization extra (bitsandbytes) is not installed")

from peft import LoraConfig  # noqa: E402
from transformers import BitsAndBytesConfig  # noqa: E402

from trl_upo import UPOTrainer  # noqa: E402

from tests.helpers import cpu_args  # noqa: E402
from tests.tiny import preference_dataset  # noqa: E402


def test_qlora_4bit_trains_with_the_upo_term(tiny_model_path, tmp_path, score_cache):
    """At step 1 the adapter is zero, so the policy equals the adapter-disabled reference and the sigmoid DPO loss is
    exactly log 2; the logged loss is then log 2 + upo_alpha * upo/aux_loss."""
    args = cpu_args(
        tmp_path, reward_heads=[{"name": "length"}], max_steps=2, upo_score_cache_dir=score_cache,
        model_init_kwargs={"dtype": torch.float32},
    )
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    trainer = UPOTrainer(
        model=tiny_model_path, args=args, train_dataset=preference_dataset(16), quantization_config=quant,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    base = trainer.model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert trainer.ref_model is None  # one copy of the 4-bit weights
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert logs[0]["loss"] == pytest.approx(math.log(2) + args.upo_alpha * logs[0]["upo/aux_loss"], rel=1e-5)
    assert all(math.isfinite(h["loss"]) for h in logs)
