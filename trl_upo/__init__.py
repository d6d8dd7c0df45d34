"""trl-upo: Unified Preference Optimization for Hugging Face TRL."""

__version__ = "0.1.0.dev0"

from .config import UPOConfig  # noqa: E402
from .heads import HeadSpec, RewardHead, register_head, registered_heads  # noqa: E402
from .collator import UPODataCollator  # noqa: E402
from .state import load_upo_state  # noqa: E402
from .trainer import UPOMixin, UPOTrainer  # noqa: E402

__all__ = [
    "HeadSpec",
    "RewardHead",
    "UPOConfig",
    "UPODataCollator",
    "UPOMixin",
    "UPOTrainer",
    "__version__",
    "load_upo_state",
    "register_head",
    "registered_heads",
]
