"""``function``: any callable with TRL's reward-function signature, as an object or a dotted path.

TRL's convention (``GRPOTrainer``): ``f(prompts=..., completions=..., completion_ids=..., **columns,
trainer_state=..., log_extra=..., log_metric=...)`` returns one float (or None) per completion. Existing TRL
reward functions work unchanged.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from ..fingerprints import SavedCallable, short_hash, stable_repr
from ..formats import completion_text
from .protocol import RewardHead
from .registry import import_dotted, register_head
from .schema import Param


def _code_digest(fn: Any) -> str:
    """A digest of what decides a reward function's scores: its own code, the source of the module that defines it
    (so editing a helper in that module re-scores) and its captured state (closure cells, defaults, partial
    arguments, a callable object's attributes and class)."""
    if isinstance(fn, functools.partial):
        text = f"{_code_digest(fn.func)}|{stable_repr(list(fn.args))}|{stable_repr(fn.keywords)}"
        return short_hash(text)
    target = getattr(fn, "__func__", fn)
    if inspect.isfunction(target):
        cells = [c.cell_contents for c in (target.__closure__ or ())]
        state = stable_repr([cells, list(target.__defaults__ or ()), target.__kwdefaults__ or {}])
        code = _code_text(target.__code__)
        names = _referenced_names(target.__code__)
    else:  # a callable object: its class's __call__ and its state (its own __getstate__ when it has one: what it
        # pickles as, without caches it fills on first call), or its attributes
        if getattr(type(fn), "__getstate__", object.__getstate__) is not object.__getstate__:
            state = stable_repr(fn.__getstate__())
        else:
            state = stable_repr(vars(fn)) if hasattr(fn, "__dict__") else ""
        call = getattr(type(fn).__call__, "__code__", None)
        code = _code_text(call) if call is not None else repr(type(fn))
        target = type(fn)
        names = {target.__name__}
    return short_hash("|".join([code, module_digest(target, names), state]))


def _referenced_names(code: Any) -> set[str]:
    """The global names a code object (and the functions nested in it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _referenced_names(const)
    return names


def _top_level_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    return []


def _used_definitions(tree: ast.Module, names: set[str]) -> str:
    """The syntax of the top-level statements that define ``names``, and of those they use in turn (transitively):
    the part of a script a reward function depends on."""
    defining: dict[str, list[ast.stmt]] = {}
    for node in tree.body:
        for name in _top_level_names(node):
            defining.setdefault(name, []).append(node)
    seen, todo, parts = set(), sorted(names), []
    while todo:
        name = todo.pop()
        if name in seen or name not in defining:
            continue
        seen.add(name)
        for node in defining[name]:
            parts.append(f"{name}={ast.dump(node)}")
            todo.extend(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id not in seen)
    return "|".join(sorted(parts))


def _code_text(code: Any) -> str:
    """The byte code, names and constants of a code object, nested functions included; no line numbers or
    addresses (the same function gives the same text in every process)."""
    consts = [
        _code_text(c) if inspect.iscode(c) else repr(sorted(map(repr, c))) if isinstance(c, frozenset) else repr(c)
        for c in code.co_consts
    ]
    return f"{code.co_code.hex()}:{code.co_names}:{code.co_varnames}:{consts}"


def module_digest(obj: Any, names: set[str] | None = None) -> str:
    """A digest of the syntax tree of the module that defines ``obj``: any change of code in that module (a
    helper the reward function calls) changes it; comments, blank lines and formatting do not. ``"nosource"`` when
    the module has no readable source (an interactive session); then only the function's own code counts.

    In the script being run (``__main__``), with ``names`` (the global names the function refers to), only the
    top-level definitions those names reach count, so editing the rest of a training script (``max_steps``,
    ``resume_from_checkpoint``) keeps the fingerprint, and the score cache and the resume check with it."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    if module is None:
        return "nosource"
    try:
        path = inspect.getsourcefile(module)
        if path:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        else:
            source = inspect.getsource(module)
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, UnicodeDecodeError):
        return "nosource"
    if names is not None and module.__name__ == "__main__":
        return short_hash("main|" + _used_definitions(tree, names))
    return short_hash(ast.dump(tree))


def _noop_log_extra(*args: Any, **kwargs: Any) -> None:
    return None


def _noop_log_metric(*args: Any, **kwargs: Any) -> None:
    return None


#: The keyword arguments a reward function gets from the head itself; a dataset column cannot have these names.
RESERVED_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


@register_head("function")
class FunctionHead(RewardHead):
    """Wraps a TRL-style reward function. Parameters: the annotated ``__init__`` signature (the schema; see
    ``docs/heads/function.md``). The fingerprint covers the function's code, the source of its module (as a syntax
    tree: comments do not count), its captured state and ``version``."""

    def __init__(
        self,
        function: Annotated[
            Callable[..., Any] | str,
            Param("the callable, or its dotted path `package.module:function` (needed in YAML)"),
        ],
        batch_size: Annotated[
            int | None,
            Param("at most this many responses per call (default: the whole scoring batch, `upo_score_batch_size`)",
                  speed_only=True, minimum=1),
        ] = None,
        version: Annotated[
            str | int | None,
            Param("any label you change to re-score when something the fingerprint cannot see changed (a helper "
                  "in another module, a data file the function reads)"),
        ] = None,
    ) -> None:
        if isinstance(function, SavedCallable):  # the config's picklable wrapper (trl_upo.fingerprints)
            function = function.fn
        self._path = function if isinstance(function, str) else None
        fn = import_dotted(function) if isinstance(function, str) else function
        if not callable(fn):
            raise ValueError(f"function head: {function!r} is not callable.")
        try:
            import torch.nn as nn

            if isinstance(fn, nn.Module):
                raise ValueError(
                    "function head: got a torch Module. Reward models are scored by the 'reward_model' head; "
                    "the function head takes a plain reward function."
                )
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"function head: batch_size must be >= 1, got {batch_size}")
        self.fn = fn
        self.batch_size, self.version = batch_size, version

    def fingerprint(self) -> str:
        return f"{super().fingerprint()}:{_code_digest(self.fn)}"

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        role: str,
        columns: dict[str, list[Any]],
        tokenizer: Any = None,
    ) -> list[float]:
        clash = sorted(set(columns) & set(RESERVED_ARGUMENTS))
        if clash:
            raise ValueError(
                f"function head {getattr(self.fn, '__name__', self.fn)!r}: the dataset has column(s) {clash}, which "
                f"collide with the reward function's own argument(s) of that name (TRL's convention passes every "
                f"other column as a keyword argument). Rename the column(s) in the dataset, e.g. "
                f"dataset.rename_column({clash[0]!r}, 'my_{clash[0]}')."
            )
        step = self.batch_size or len(completions) or 1
        scores: list[float] = []
        for i in range(0, len(completions), step):
            scores.extend(
                self._call(
                    prompts[i : i + step],
                    completions[i : i + step],
                    {k: v[i : i + step] for k, v in columns.items()},
                    tokenizer,
                )
            )
        return scores

    def _call(self, prompts, completions, columns, tokenizer) -> list[float]:
        if tokenizer is not None:
            texts = [completion_text(c) for c in completions]
            completion_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        else:
            completion_ids = None
        out = self.fn(
            prompts=list(prompts),
            completions=list(completions),
            completion_ids=completion_ids,
            **columns,
            trainer_state=None,
            log_extra=_noop_log_extra,
            log_metric=_noop_log_metric,
        )
        try:
            out = list(out)
        except TypeError:
            raise ValueError(
                f"function head: {getattr(self.fn, '__name__', self.fn)!r} returned {type(out).__name__}; a reward "
                f"function must return one float per completion."
            ) from None
        if len(out) != len(completions):
            raise ValueError(
                f"function head: {getattr(self.fn, '__name__', self.fn)!r} returned {len(out)} rewards for "
                f"{len(completions)} completions; it must return exactly one per completion."
            )
        return [float("nan") if v is None else float(v) for v in out]
