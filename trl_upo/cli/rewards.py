"""``reward_funcs`` and ``reward_weights`` in a ``trl-upo train`` recipe: TRL's way of naming rewards (``trl grpo``),
turned into ``function`` reward heads next to ``reward_heads``.

An entry of ``reward_funcs`` is one of:

- the name of a function in ``trl.rewards`` (``think_format_reward``, ``accuracy_reward``, ...);
- a dotted path to a reward function (``my_rewards.brevity`` or ``my_rewards:brevity``; the current directory is
  importable);
- a *factory* called with keyword arguments, written as a call, ``get_soft_overlong_punishment(max_completion_len=512,
  soft_punish_cache=64)``, or as a one-key mapping, ``{get_soft_overlong_punishment: {max_completion_len: 512, ...}}``
  (the arguments are YAML/Python literals). The factory (a ``trl.rewards`` name or a dotted path) is called once per
  process and its result is the reward function.

``reward_weights`` gives one weight per entry (default 1.0 each), as in ``GRPOConfig``. Each entry becomes the head
``{"name": <function name without get_>, "type": "function", "weight": w, "params": {"function": ...}}``.
"""

from __future__ import annotations

import ast
import importlib
from typing import Any

from trl_upo.cli.common import UsageError, did_you_mean


class RewardFactory:
    """A reward function made by calling ``factory(**kwargs)``, kept as the factory's path and its arguments: it
    pickles (into ``training_args.bin`` and to other processes) and its fingerprint changes with the arguments.

    Args:
        factory: Dotted path of the factory (``"trl.rewards:get_soft_overlong_punishment"``).
        kwargs: The factory's keyword arguments (literals).
    """

    def __init__(self, factory: str, kwargs: dict[str, Any]) -> None:
        self.factory = factory
        self.kwargs = dict(kwargs)
        self.__name__ = factory.rpartition(":")[2].rpartition(".")[2]
        self._describe()

    def _describe(self) -> None:
        """Name the function as the factory call that makes it: ``__module__`` the factory's module and
        ``__qualname__`` the call, so ``upo_state.json``, the config's ``to_dict`` and the model card record
        ``trl.rewards:get_soft_overlong_punishment(max_completion_len=512, ...)``, not this class."""
        module, sep, function = self.factory.partition(":")
        if not sep:
            module, _, function = self.factory.rpartition(".")
        self.__dict__["__module__"] = module
        self.__dict__["__qualname__"] = repr(self).replace(self.__name__, function, 1)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._describe()

    def _function(self):
        fn = self.__dict__.get("_fn")
        if fn is None:
            from trl_upo.heads.registry import import_dotted

            fn = import_dotted(self.factory)(**self.kwargs)
            self.__dict__["_fn"] = fn
        return fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the reward function the factory made."""
        return self._function()(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": self.kwargs, "__name__": self.__name__}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.__name__}({args})"


def trl_reward_names() -> list[str]:
    """The public functions of ``trl.rewards`` (TRL's reward-function registry), sorted."""
    module = importlib.import_module("trl.rewards")
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    return sorted(n for n in names if callable(getattr(module, n, None)))


def _parse_call(text: str) -> tuple[str, dict[str, Any]] | None:
    """``name(a=1, b="x")`` -> ``("name", {"a": 1, "b": "x"})``; None when ``text`` is no call."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call):
        return None
    if node.args:
        raise UsageError(f"reward_funcs entry {text!r}: give the factory's arguments by name (`name=value`).")
    try:
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError:
        raise UsageError(f"reward_funcs entry {text!r}: the arguments must be literals (numbers, strings, lists).")
    return ast.unparse(node.func), kwargs


def _target(name: str) -> str:
    """The dotted path of a ``trl.rewards`` name or of a dotted path, checked to import."""
    from trl_upo.heads.registry import import_dotted

    trl_names = trl_reward_names()
    path = f"trl.rewards:{name}" if name in trl_names else name
    if path == name and "." not in name and ":" not in name:
        raise UsageError(
            f"reward_funcs: {name!r} is neither a function of trl.rewards{did_you_mean(name, trl_names)} nor a "
            f"dotted path (module.function). TRL's reward functions: {', '.join(trl_names)}."
        )
    try:
        obj = import_dotted(path)
    except ValueError as e:
        raise UsageError(f"reward_funcs: {e} (a module in the current directory is importable).") from None
    if not callable(obj):
        raise UsageError(f"reward_funcs: {path!r} is not callable.")
    return path


def _entry(entry: Any) -> tuple[str, Any]:
    """``(head name, the function head's ``function`` parameter)`` of one ``reward_funcs`` entry."""
    if isinstance(entry, dict):
        if len(entry) != 1 or not isinstance(next(iter(entry.values())) or {}, dict):
            raise UsageError(
                f"reward_funcs entry {entry!r}: a mapping names one factory and its arguments, e.g. "
                f"{{get_soft_overlong_punishment: {{max_completion_len: 512, soft_punish_cache: 64}}}}."
            )
        name, kwargs = next(iter(entry.items()))
        call: tuple[str, dict[str, Any]] | None = (str(name), dict(kwargs or {}))
    elif isinstance(entry, str) and entry.strip():
        call = _parse_call(entry) if "(" in entry else None
        name = entry.strip()
    else:
        raise UsageError(f"reward_funcs entry {entry!r}: give a function name, a dotted path or a factory call.")
    if call is None:
        path = _target(name)
        return path.rpartition(":")[2].rpartition(".")[2], path
    factory = _target(call[0])
    short = factory.rpartition(":")[2].rpartition(".")[2]
    return short.removeprefix("get_"), RewardFactory(factory, call[1])


def reward_func_heads(funcs: Any, weights: Any, taken: list[str] | tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The ``function`` head specs of ``reward_funcs`` with ``reward_weights``.

    Args:
        funcs: The ``reward_funcs`` entries (a list, or one entry).
        weights: One weight per entry, or None (1.0 each).
        taken: Head names already used by ``reward_heads`` (a clashing name gets a ``_2`` suffix).

    Returns:
        The head specs, as mappings for ``reward_heads``.

    Raises:
        UsageError: an entry that names no function, or weights that do not match the entries.
    """
    if not funcs:
        if weights:
            raise UsageError("reward_weights is given without reward_funcs: give one weight per reward function.")
        return []
    funcs = funcs if isinstance(funcs, (list, tuple)) else [funcs]
    weights = [1.0] * len(funcs) if weights in (None, []) else list(weights)
    if len(weights) != len(funcs):
        raise UsageError(
            f"reward_weights has {len(weights)} values for {len(funcs)} reward_funcs: give one weight per function."
        )
    heads, names = [], set(taken)
    for entry, weight in zip(funcs, weights, strict=True):
        name, function = _entry(entry)
        unique, k = name, 2
        while unique in names:
            unique, k = f"{name}_{k}", k + 1
        names.add(unique)
        heads.append({"name": unique, "type": "function", "weight": float(weight), "params": {"function": function}})
    return heads
