"""The trainers ``trl-upo train`` can run, selected by the recipe's ``trainer:`` key (like ``trl dpo`` / ``trl kto``):
each is imported only when a recipe selects it, and the recipe is parsed against its config class.
"""

from __future__ import annotations

from trl_upo.cli.common import UsageError, did_you_mean

#: ``trainer:`` value -> (module, config class, trainer class), imported when the recipe selects it.
TRAINERS: dict[str, tuple[str, str, str]] = {
    "dpo": ("trl_upo", "UPOConfig", "UPOTrainer"),
    "kto": ("trl_upo.kto", "UPOKTOConfig", "UPOKTOTrainer"),
}


def trainer_classes(kind: str = "dpo") -> tuple[type, type]:
    """The config and trainer classes of a ``trainer:`` value (:data:`TRAINERS`), imported now.

    Raises:
        UsageError: an unknown value, or a trainer this installation does not have.
    """
    import importlib

    if kind not in TRAINERS:
        raise UsageError(f"trainer: {kind!r} is not one of {list(TRAINERS)}{did_you_mean(str(kind), TRAINERS)}.")
    module_name, config_name, trainer_name = TRAINERS[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise UsageError(f"trainer: {kind} needs {module_name}, which this trl-upo installation does not have; "
                         f"upgrade trl-upo or use trainer: dpo.") from None
    return getattr(module, config_name), getattr(module, trainer_name)
