"""The ``trl-upo`` command: ``trl-upo <command> [options]``.

Each command lives in its own module of this package and exposes ``main(argv: list[str], prog: str) -> int``; the
modules are imported only when their command runs, so ``trl-upo --help`` stays fast and one command's optional
dependencies never break another. :mod:`trl_upo.cli.common` holds what the commands share (the usage error and exit
code 2, YAML configs, strict option parsing); :mod:`trl_upo.cli.launch` re-launches ``train`` under
``accelerate launch``.

``--debug`` with no value (anywhere on the command line: last, or followed by another ``--option``), or
``TRL_UPO_DEBUG=1``, prints the traceback of usage errors too; ``--debug VALUE`` is left to the command (transformers'
``TrainingArguments.debug`` in ``train``, e.g. ``--debug underflow_overflow``), see :func:`pop_debug`. The
command never puts the current directory on ``sys.path`` (a ``yaml.py`` there is not imported in place of PyYAML);
a recipe that names a module next to it (``function: my_rewards:brevity``) gets it imported explicitly, with a warning
naming the file, only when no installed module has that name (:mod:`trl_upo.heads.dotted`, docs/trust.md).
"""

from __future__ import annotations

import importlib
import os
import sys

#: command name -> (module, one-line help). Run as ``trl-upo <name> --help`` for each command's options.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("trl_upo.cli.train", "train with UPO from a YAML recipe, like `trl dpo` (no recipe: the CPU quickstart)"),
    "score": ("trl_upo.cli.score", "score a dataset with the configured reward heads and print a per-head summary"),
    "eval": ("trl_upo.cli.eval", "evaluate a trained policy on designer objectives and held-out preferences"),
    "build-pairs": ("trl_upo.cli.build_pairs", "build preference pairs by reward ranking or self-critique"),
    "iterate": ("trl_upo.cli.iterate", "iterative UPO rounds: sample the policy, judge, train again (no config: CPU demo)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: trl-upo <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`trl-upo <command> --help` lists a command's options; `trl-upo --version` prints the version;",
              "`--debug` with no value (or TRL_UPO_DEBUG=1) shows the traceback of usage errors."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``trl-upo`` console script (also ``python -m trl_upo.cli``)."""
    argv = pop_debug(list(sys.argv[1:] if argv is None else argv), commands=COMMANDS)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from trl_upo import __version__

        print(f"trl-upo {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from trl_upo.cli.common import closest

        match = closest(name, COMMANDS)
        hint = f" Did you mean `trl-upo {match}`?" if match else ""
        print(f"trl-upo: unknown command {name!r}.{hint} Commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest, prog=f"trl-upo {name}") or 0)


def pop_debug(argv: list[str], commands=()) -> list[str]:
    """``argv`` without trl-upo's own ``--debug`` flags, setting ``TRL_UPO_DEBUG=1`` (inherited by the processes
    ``accelerate launch`` starts) when there was one.

    A ``--debug`` is ours when no value follows it: it is the last token, the next token starts with ``--``, or (before
    the command) the next token is a command name. ``--debug VALUE`` and ``--debug=VALUE`` are left in place: they are
    ``TrainingArguments.debug`` (e.g. ``--debug underflow_overflow``).

    Args:
        argv: The command-line arguments.
        commands: Command names that may follow a leading ``--debug`` (``trl-upo --debug train ...``).

    Returns:
        The arguments without our ``--debug`` flags.
    """
    out = []
    for i, tok in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if tok == "--debug" and (nxt is None or nxt.startswith("--") or (not out and nxt in commands)):
            os.environ["TRL_UPO_DEBUG"] = "1"
            continue
        out.append(tok)
    return out
