"""Evaluate a policy: designer objectives on its generations, preference quality on held-out pairs.

Three measurements, usable alone or together through :func:`evaluate_policy` (:mod:`.policy`):

1. :func:`generate_responses` (:mod:`.generation`): batched sampling (left padding, prompts tokenised exactly as
   ``DPOTrainer`` tokenises them, so the model sees the context it was trained on; :mod:`.batching`).
2. :func:`designer_metrics` (:mod:`.designer`): the raw scores of reward heads (the spec dicts ``UPOTrainer`` takes)
   on the generated responses: mean, standard deviation and count per head, with no normalisation.
3. :func:`preference_metrics` (:mod:`.preference`): DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))``
   on held-out pairs: the accuracy (chosen reward above rejected reward, ties counting half) and the margins;
   :func:`unpaired_metrics` (:mod:`.unpaired`): the same implicit reward on held-out unpaired rows (KTO's data).
   Both compute it with :mod:`.implicit` (:func:`implicit_rewards`, :func:`completion_logps`).

``model`` and ``ref_model`` may be loaded models or paths: a full model directory (or Hub id) or a PEFT adapter
directory, whose base model is loaded from the adapter's config (:func:`trl_upo.models.load_model`, re-exported here
with :func:`trl_upo.models.load_tokenizer`).
"""

from ..formats import is_conversational as is_conversational_prompt  # the name this module used before formats.py
from ..models import load_model, load_tokenizer
from .batching import eval_mode
from .designer import designer_metrics, text_head_specs
from .generation import generate_responses
from .plotting import require_matplotlib
from .policy import evaluate_policy
from .implicit import METRIC_NAMES, completion_logps, implicit_rewards, tie_half_accuracy
from .preference import preference_metrics
from .unpaired import unpaired_metrics, unpaired_rows

__all__ = [
    "METRIC_NAMES",
    "completion_logps",
    "designer_metrics",
    "eval_mode",
    "evaluate_policy",
    "generate_responses",
    "implicit_rewards",
    "is_conversational_prompt",
    "load_model",
    "load_tokenizer",
    "preference_metrics",
    "require_matplotlib",
    "text_head_specs",
    "tie_half_accuracy",
    "unpaired_metrics",
    "unpaired_rows",
]
