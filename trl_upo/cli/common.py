"""What the ``trl-upo`` commands share: the usage error and its exit code, YAML configs, strict option parsing with a
did-you-mean for every unknown key, and the one place that turns a usage problem into ``<prog>: error: ...``.

Every command parses its options with dataclasses through ``transformers.HfArgumentParser`` (``trl.TrlParser`` for
the recipe commands): a YAML ``--config`` sets defaults, flags override them, and an unknown key, in the YAML or on
the command line, is an error naming the closest valid key, raised before anything loads (``eval``'s ``--config`` is
a training recipe it reads heads from, not its own options). ``HfArgumentParser``
accepts ``--foo-bar`` for every ``foo_bar`` field, and ``--no_foo`` / ``--no-foo`` for a boolean field whose default
is true; :func:`add_negative_flags` adds the same for the other boolean fields.

Options renamed upstream (:data:`RENAMED_KEYS`) are accepted under either name: :func:`rename_keys` (a recipe's keys)
and :func:`rename_flags` (command-line flags) give each the name the installed dataclasses take, before the strict
key check.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import traceback
import typing
from collections.abc import Callable, Iterable
from typing import Any

from ..checkpoints import IncompleteSaveError
from ..formats import DataError
from ..resources import ResourcePathError

#: Exit code of a usage problem (a bad flag, key, value, file or split), printed without a traceback.
EXIT_USAGE = 2
#: Set to 1 (or pass ``--debug`` to ``trl-upo``) to print the traceback of usage problems too.
DEBUG_ENV = "TRL_UPO_DEBUG"


class UsageError(ValueError):
    """A problem with the command line, the YAML config or the inputs they name (exit code 2, no traceback)."""


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``word``, when one is close enough to suggest (``difflib``, cutoff 0.6).

    Args:
        word: The unknown name.
        choices: The valid names.

    Returns:
        The closest valid name, or None.
    """
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return match[0] if match else None


def did_you_mean(word: str, choices: Iterable[str], quote: str = "`") -> str:
    """The suggestion that ends an unknown-key message: `` (did you mean `key`?)``, or an empty string.

    Args:
        word: The unknown name.
        choices: The valid names.
        quote: The quote around the suggestion.

    Returns:
        The suggestion, with a leading space, or ``""`` when no valid name is close.
    """
    match = closest(word, choices)
    return f" (did you mean {quote}{match}{quote}?)" if match else ""


def unknown_key(key: str, where: str, choices: Iterable[str]) -> str:
    """The message of one unknown key: ``unknown key `key` in the <where> (did you mean `...`?)``.

    Args:
        key: The unknown key.
        where: Where it was found (``"command line"``, ``"recipe r.yaml"``).
        choices: The valid keys.

    Returns:
        The message.
    """
    if key in REMOVED_KEYS:
        return f"`{key}` in the {where} is no longer an option: {REMOVED_KEYS[key]}"
    return f"unknown key `{key}` in the {where}{did_you_mean(key, choices)}"


def raise_problems(problems: list[str], footer: str, header: str = "invalid options:") -> None:
    """Raise one :class:`UsageError` listing every problem found, if there is any.

    Args:
        problems: One message per problem.
        footer: The last line (where the valid keys are listed).
        header: The first line.

    Raises:
        UsageError: ``problems`` is not empty.
    """
    if problems:
        raise UsageError("\n  ".join([header, *problems]) + "\n" + footer)


def pop_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--config PATH`` (or ``--config=PATH``) out of the arguments; a ``upo://`` path names a packaged asset.

    Args:
        argv: The command's arguments.

    Returns:
        ``(path or None, the other arguments)``.

    Raises:
        UsageError: ``--config`` without a path.
        FileNotFoundError: a ``upo://`` path that is not in the package.
    """
    from trl_upo.resources import resolve_resource

    rest = list(argv)
    for i, tok in enumerate(rest):
        if tok.startswith("--config="):
            return resolve_resource(tok.split("=", 1)[1]), rest[:i] + rest[i + 1 :]
        if tok == "--config":
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise UsageError("`--config` needs the path of a YAML file.")
            return resolve_resource(rest[i + 1]), rest[:i] + rest[i + 2 :]
    return None, rest


def read_yaml(path: str, what: str = "config", allow_empty: bool = True) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping of ``key: value``.

    Args:
        path: The file.
        what: What the file is, for messages (``"recipe"``, ``"config"``).
        allow_empty: Read an empty file as ``{}`` (otherwise it is an error).

    Returns:
        The mapping.

    Raises:
        UsageError: the file cannot be read, is not valid YAML, or does not hold a mapping.
    """
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"cannot read the {what} {path!r}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        raise UsageError(f"the {what} {path!r} is not valid YAML: {e}") from None
    if data is None and allow_empty:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"the {what} {path!r} must be a YAML mapping of `key: value`, got {type(data).__name__}.")
    return data


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` layout of the commands: the description as written, and each option's default unless it is None
    or its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def option(help: str, default: Any = dataclasses.MISSING, **metadata: Any) -> Any:
    """A field of an argument dataclass: its default (none: a required option) and its ``--help`` text.

    Args:
        help: The ``--help`` text.
        default: The default value.
        metadata: More ``argparse.add_argument`` keywords (``choices``, ``metavar``, ``nargs``, ...).

    Returns:
        The ``dataclasses.field``.
    """
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    """The keys a parser takes (the destinations of its options, without ``help``), sorted."""
    return sorted({a.dest for a in parser._actions if a.option_strings and a.dest != "help"})


#: Options renamed upstream, as ``(new name, old name, the release that renamed it)``. A recipe or command line may
#: use either name; :func:`installed_name` picks the one the installed dataclasses take: the new name when they have
#: it (the old one may still be there as a deprecated alias), else the old one. Add a row when a rename lands.
RENAMED_KEYS: tuple[tuple[str, str, str], ...] = (
    ("activation_checkpointing", "gradient_checkpointing", "transformers 5.23"),
    ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs", "transformers 5.23"),
    ("dtype", "torch_dtype", "transformers 4.56 and TRL's ModelConfig"),
    ("eval_strategy", "evaluation_strategy", "transformers 4.46"),
    ("use_cpu", "no_cuda", "transformers 4.34"),
    ("hub_model_id", "push_to_hub_model_id", "transformers 4.8"),
    ("warmup_steps", "warmup_ratio", "transformers 5.0 (a float below 1 is a ratio)"),
    ("dataset_num_proc", "preprocessing_num_workers", "TRL (the alignment handbook's name)"),
    ("use_liger_kernel", "use_liger_loss", "TRL 0.20"),
)

#: Keys of other stacks' recipes (the alignment handbook, older TRL and transformers) with no one-to-one new name:
#: key -> what happened to it and what to write instead. An unknown key found here gets this message.
REMOVED_KEYS: dict[str, str] = {
    "max_prompt_length": "TRL 1.0 truncates prompt + completion together; set `max_length` (and `truncation_mode`).",
    "max_completion_length": "TRL 1.0 truncates prompt + completion together; set `max_length`.",
    "padding_value": "TRL 1.0 pads with the tokenizer's pad token; remove the key.",
    "use_flash_attention_2": "write `attn_implementation: flash_attention_2`.",
    "overwrite_output_dir": "transformers 5 always writes into `output_dir`; remove the key (or change `output_dir`).",
    "chat_template": "set the template on the tokenizer you train with (`tokenizer.chat_template`), then remove it.",
}


def _renamed(key: str) -> tuple[str, str, str] | None:
    """The row of :data:`RENAMED_KEYS` that names ``key`` (under either name), or None."""
    return next((row for row in RENAMED_KEYS if key in row[:2]), None)


def installed_name(key: str, names: Iterable[str]) -> str:
    """The name a key takes on the installed stack: a renamed key's name there (see :data:`RENAMED_KEYS`), or the
    key itself.

    Args:
        key: A key of a recipe or command line.
        names: The keys the installed parser takes (:func:`option_names`).

    Returns:
        The new name when ``names`` has it, else the old name when ``names`` has it, else ``key`` unchanged (an
        unknown key stays unknown).
    """
    row = _renamed(key)
    if row is None:
        return key
    names = set(names)
    return next((name for name in row[:2] if name in names), key)


def _check_one_name(keys: Iterable[str], where: str) -> None:
    """Refuse the old and the new name of one renamed option given together (in one recipe, or on the command line)."""
    seen = [k for k in dict.fromkeys(keys) if _renamed(k)]
    for new, old, since in RENAMED_KEYS:
        if new in seen and old in seen:
            raise UsageError(
                f"`{new}` and `{old}` are both given {where}: they are one option (`{old}` was renamed `{new}` in "
                f"{since}); give only one of them."
            )


def rename_keys(config: dict[str, Any], names: Iterable[str], where: str) -> dict[str, Any]:
    """A recipe's mapping with every renamed key (:data:`RENAMED_KEYS`) under its installed name, order kept.

    Args:
        config: The recipe's ``key: value`` mapping.
        names: The keys the installed parser takes (:func:`option_names`).
        where: Where the keys come from, for the message (``"in the recipe r.yaml"``).

    Returns:
        A new mapping.

    Raises:
        UsageError: the old and the new name of one option are both keys of ``config``.
    """
    _check_one_name(config, where)
    names = set(names)
    return {installed_name(k, names) if isinstance(k, str) else k: v for k, v in config.items()}


def rename_flags(tokens: list[str], parser: argparse.ArgumentParser, where: str = "on the command line") -> list[str]:
    """Command-line tokens with every renamed flag (:data:`RENAMED_KEYS`) under its installed name.

    ``--old``, ``--old=value`` and dashed spellings (``--old-name``) are renamed; the negative ``--no_old`` (or
    ``--no_new``) of a boolean option becomes ``--no_<installed name>`` where the parser has it, else
    ``--<installed name>=false``. Values and every other token are kept as they are.

    Args:
        tokens: The command's arguments.
        parser: The parser that will read them.
        where: Where the tokens come from, for the message.

    Returns:
        The tokens, renamed.

    Raises:
        UsageError: the old and the new name of one option are both given.
    """
    names = option_names(parser)
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    out, seen = [], []
    for tok in tokens:
        head, eq, value = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
        key = head.replace("-", "_")
        negative = key.startswith("no_") and _renamed(key[3:]) is not None
        key = key[3:] if negative else key
        if not head or _renamed(key) is None:
            out.append(tok)
            continue
        seen.append(key)
        target = installed_name(key, names)
        if not negative:
            out.append(tok if target == key else f"--{target}{eq}{value}")
        elif f"--no_{target}" in actions:
            out.append(f"--no_{target}{eq}{value}")
        elif getattr(actions.get(f"--{target}"), "const", None) is True:  # a boolean: `--flag [true|false]`
            out.append(f"--{target}=false")
        else:
            out.append(tok)
    _check_one_name(seen, where)
    return out


def split_leftovers(
    tokens: list[str], known: dict[str, bool] | None = None, from_yaml: bool = False
) -> tuple[list[tuple[str, Any]], list[str], list[str]]:
    """Read the ``--key [value]`` tokens a parser left over.

    Args:
        tokens: The leftover tokens.
        known: Keys taken here rather than by the parser (``accelerate launch`` options), as
            ``{key: takes_a_value}``; a boolean key takes a following ``true``/``false``.
        from_yaml: The tokens come from a YAML file, where every key has a value.

    Returns:
        ``(known options as (key, value), unknown keys, stray tokens)``.

    Raises:
        UsageError: a known key that needs a value has none.
    """
    known = known or {}
    found: list[tuple[str, Any]] = []
    unknown: list[str] = []
    stray: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            stray.append(tok)
            i += 1
            continue
        key, _, inline = tok[2:].partition("=")
        key = key.replace("-", "_")
        takes_value = known.get(key)
        has_next = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
        if takes_value is None:
            unknown.append(key)
            i += 2 if (has_next and not inline) else 1
            continue
        if inline:
            value: Any = inline
            i += 1
        elif takes_value or (from_yaml and has_next) or (has_next and tokens[i + 1].lower() in ("true", "false")):
            if not has_next:
                raise UsageError(f"`{key}` needs a value (--{key} VALUE).")
            value = tokens[i + 1]
            i += 2
        else:
            value = True
            i += 1
        found.append((key, value))
    return found, unknown, stray


def leftover_problems(unknown: list[str], stray: list[str], choices: Iterable[str]) -> list[str]:
    """Messages for the unknown keys and stray values of a command line (see :func:`split_leftovers`)."""
    choices = list(choices)
    problems = [unknown_key(key, "command line", choices) for key in unknown]
    problems += [f"unexpected argument {tok!r} on the command line (options are `--key value`)" for tok in stray]
    return problems


def add_negative_flags(parser: argparse.ArgumentParser, *dataclass_types: type) -> None:
    """Add ``--no_foo`` / ``--no-foo`` / ``--no-foo_bar`` (store false) for every boolean field whose default is not
    true (``HfArgumentParser`` adds them only for a default of true), so that ``--foo`` and ``--no-foo`` both work.

    Args:
        parser: The parser built from ``dataclass_types``.
        dataclass_types: The argument dataclasses.
    """
    taken = {opt for action in parser._actions for opt in action.option_strings}
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if f.default is True or hints[f.name] not in (bool, bool | None):
                continue
            flags = [f"--no_{f.name}", f"--no-{f.name}", f"--no-{f.name.replace('_', '-')}"]
            flags = [flag for flag in dict.fromkeys(flags) if flag not in taken]
            if flags:
                parser.add_argument(*flags, action="store_false", dest=f.name, help=argparse.SUPPRESS)


def parse_strict(parser: Any, argv: list[str], command: str) -> tuple[Any, ...]:
    """Parse ``argv`` into the parser's dataclasses; any key the parser does not take is an error.

    Args:
        parser: A ``transformers.HfArgumentParser``.
        argv: The arguments (a YAML config already applied as defaults).
        command: The command, for the message (``"trl-upo eval"``).

    Returns:
        One instance per dataclass of the parser.

    Raises:
        UsageError: unknown keys (each with the closest valid key) or stray values.
        SystemExit: ``--help``, or a value ``argparse`` rejects (it prints why).
    """
    *parsed, leftovers = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    _, unknown, stray = split_leftovers(leftovers)
    raise_problems(leftover_problems(unknown, stray, option_names(parser)), f"`{command} --help` lists the options.")
    return tuple(parsed)


def exit_code(stop: SystemExit) -> int:
    """The exit code a ``SystemExit`` stands for (``argparse`` exits 0 after ``--help``, 2 on a bad value)."""
    if stop.code is None or isinstance(stop.code, int):
        return int(stop.code or 0)
    print(stop.code, file=sys.stderr)
    return 1


def debug_enabled() -> bool:
    """Whether usage problems print their traceback too (``--debug``, or ``TRL_UPO_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


#: Errors a user fixes by changing what they typed or named (exit code 2, one message, no traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, DataError, ResourcePathError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
    IncompleteSaveError,
)


def run_command(prog: str, body: Callable[[], int | None], errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command; a usage problem is printed as ``<prog>: error: <message>`` and gives exit code 2.

    Usage problems are :data:`USER_ERRORS`, :class:`~trl_upo.data.loading.DatasetLoadError` (a dataset that cannot
    be loaded as asked), ``argparse``'s own exits, and the command's ``errors``. Their traceback is printed only in
    debug mode (:func:`debug_enabled`); any other exception is an internal error and keeps its traceback.

    Args:
        prog: The program name that starts the message (``"trl-upo train"``).
        body: The command; returns its exit code (None: 0).
        errors: More exception types the command reports as usage problems.

    Returns:
        The exit code.
    """
    from trl_upo.data.loading import DatasetLoadError

    try:
        return int(body() or 0)
    except (*USER_ERRORS, DatasetLoadError, *errors) as e:
        if debug_enabled():
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:
        return exit_code(e)


def end_distributed(completed: bool = True) -> None:
    """Tear down the ``torch.distributed`` process group, if this process started one (commands call it last).

    Root cause of the exit hang this prevents: a Gloo group whose last reference is dropped later (by the DDP
    ``Reducer`` inside a garbage collection, after ``accelerator.end_training()`` destroyed the group) runs its
    destructor with the GIL held and joins its worker threads; a worker still finishing a collective, or one that needs
    the GIL, never returns once the peer rank has exited. So, in this order: every rank reaches the end (a bounded
    ``monitored_barrier`` on Gloo names the missing rank; then a barrier that waits for all queued work), the garbage
    (trainer, DDP model, reducer) is collected while the group is still registered (no destructor runs there), and
    only then is the group destroyed, with no work in flight.

    Args:
        completed: False on an error path: no barrier (the other ranks may never arrive), only the teardown.
    """
    import gc
    from datetime import timedelta

    dist = sys.modules.get("torch.distributed")
    active = dist is not None and dist.is_available() and dist.is_initialized()
    if active and completed and dist.get_world_size() > 1:
        if dist.get_backend() == "gloo":
            timeout = float(os.environ.get("TRL_UPO_EXIT_BARRIER_TIMEOUT", "300"))
            dist.monitored_barrier(timeout=timedelta(seconds=timeout), wait_all_ranks=True)
        dist.barrier()
    gc.collect()
    if active and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
