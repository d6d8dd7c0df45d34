"""Head specs checked when the config is built, before scoring (issue 23, items 8 and 9)."""

from __future__ import annotations

import pytest

from trl_upo.heads.spec import RESERVED_HEAD_NAMES, parse_head_specs


@pytest.mark.parametrize("name", RESERVED_HEAD_NAMES)
def test_a_head_named_like_upos_own_metrics_is_refused(name):
    """Before: `reward_aux` passed, the data was scored, and step 1 died with KeyError: 'upo/reward_aux/chosen'."""
    with pytest.raises(ValueError, match=f"head name '{name}' is one of UPO's own metric names"):
        parse_head_specs([{"name": name, "type": "length"}])


def test_a_type_named_loglik_is_refused_by_its_default_name():
    with pytest.raises(ValueError, match="UPO's own metric names"):
        parse_head_specs([{"type": "loglik"}])


def test_upo_config_refuses_a_reserved_name(tmp_path):
    from trl_upo import UPOConfig

    with pytest.raises(ValueError, match="reward_aux"):
        UPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, reward_heads=[{"name": "reward_aux",
                                                                                       "type": "length"}])


def test_a_head_class_object_as_type():
    """`{"type": LengthHead}` used to be parsed as the dotted path "<class '...'>"."""
    from trl_upo.heads.length import LengthHead

    spec = parse_head_specs([{"type": LengthHead, "params": {"unit": "words"}}])[0]
    assert (spec.name, spec.type) == ("length", "length")

    class NotAHead:
        pass

    with pytest.raises(ValueError, match="is not a RewardHead subclass"):
        parse_head_specs([{"name": "x", "type": NotAHead}])
