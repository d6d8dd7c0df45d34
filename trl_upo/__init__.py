"""trl-upo: Unified Preference Optimization for Hugging Face TRL.

The public names load on first use (``from trl_upo import UPOTrainer`` imports the trainer, and with it torch and
TRL, only then), so ``trl-upo --help`` and ``--version`` start without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .lazy import lazy_getattr

__version__ = "0.1.0.dev0"

#: public name -> the module that defines it
_EXPORTS = {
    "HeadSpec": "trl_upo.heads",
    "RewardHead": "trl_upo.heads",
    "register_head": "trl_upo.heads",
    "registered_heads": "trl_upo.heads",
    "UPOArguments": "trl_upo.config",
    "UPOConfig": "trl_upo.config",
    "UPOKTOConfig": "trl_upo.config",
    "UPOKTOMixin": "trl_upo.kto",
    "UPOKTOTrainer": "trl_upo.kto",
    "UPODataCollator": "trl_upo.collator",
    "UPOMixin": "trl_upo.trainer",
    "UPOTrainer": "trl_upo.trainer",
    "load_upo_state": "trl_upo.state",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # what the names are, for type checkers and the API reference
    from .collator import UPODataCollator
    from .config import UPOArguments, UPOConfig, UPOKTOConfig
    from .heads import HeadSpec, RewardHead, register_head, registered_heads
    from .kto import UPOKTOMixin, UPOKTOTrainer
    from .state import load_upo_state
    from .trainer import UPOMixin, UPOTrainer


#: Import a public name's module the first time the name is used.
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
