"""``--help`` of the recipe commands: trl-upo's own options first, then the TRL and transformers options, with the
Sphinx roles of docstrings (``:class:`~trl_upo.UPOConfig```) shown as plain names.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

#: ``:role:`~pkg.mod.Name``` or ``:role:`text <target>``` (``~``: show only the last part of the name).
_ROLE = re.compile(
    r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc):`(?P<tilde>~?)(?P<name>[^`<]*?)(?:\s*<[^>]*>)?`"
)


def plain_roles(text: str | None) -> str | None:
    """``text`` with Sphinx roles replaced by the name they show, in backticks (``~a.b.C`` shows ``C``)."""
    if not text:
        return text

    def shown(m: re.Match) -> str:
        name = m["name"].strip()
        return f"`{name.rpartition('.')[2] if m['tilde'] else name}`"

    return _ROLE.sub(shown, text)


class RecipeHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, Sphinx roles shown as plain names, descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if all(opt.startswith(("--no_", "--no-")) for opt in action.option_strings):
            return plain_roles(action.help)  # the default shown would be the negation's, not the option's
        return plain_roles(super()._get_help_string(action))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in plain_roles(text).splitlines(keepends=True))


def own_fields(cls: type, base: type | None) -> list[str]:
    """The fields ``cls`` adds to ``base`` (all of its fields when ``base`` is None)."""
    inherited = {f.name for f in dataclasses.fields(base)} if base is not None else set()
    return [f.name for f in dataclasses.fields(cls) if f.name not in inherited]


def put_first(parser: argparse.ArgumentParser, title: str, description: str, dests: list[str]) -> None:
    """Move the options with destinations ``dests`` (in that order) into a new group ``title``, shown before the
    other groups of ``--help``.

    Args:
        parser: The parser.
        title: The group's title.
        description: The text under the title.
        dests: The options' destinations; those the parser lacks are skipped.
    """
    group = parser.add_argument_group(title, description)
    by_dest = {a.dest: a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS}
    for dest in dests:
        action = by_dest.get(dest)
        if action is None:
            continue
        for other in parser._action_groups:
            if action in other._group_actions:
                other._group_actions.remove(action)
        group._group_actions.append(action)
    parser._action_groups.remove(group)
    first = next((i for i, g in enumerate(parser._action_groups) if g._group_actions and g.title not in
                  ("positional arguments",)), len(parser._action_groups))
    parser._action_groups.insert(first, group)


def retitle_rest(parser: argparse.ArgumentParser, title: str, keep: tuple[str, ...]) -> None:
    """Give the groups not in ``keep`` (and not empty) the title ``title`` (the inherited TRL/transformers options)."""
    for group in parser._action_groups:
        if group.title not in keep and group._group_actions:
            group.title = title


#: The opening of ``trl-upo train --help``.
HELP_INTRO = """Train with UPO from a YAML recipe, like `trl dpo`. Every option below is a recipe key (`key: value`)
or a flag (`--key value`); flags override the recipe.

  --config RECIPE.yaml   the recipe (a file or upo://<asset>); without it: the CPU quickstart recipe
                         (upo://quickstart.yaml) with your flags applied
  --debug                (no value) print the traceback of usage errors too (or TRL_UPO_DEBUG=1);
                         `--debug VALUE` (e.g. underflow_overflow) is transformers' `debug` option, listed below

Launch keys (several processes; the command re-launches itself with `accelerate launch`):
  num_processes N, num_machines, machine_rank, main_process_ip, main_process_port, mixed_precision, and every
  other `accelerate launch --help` option;
  accelerate_config NAME_OR_FILE: a config file, or the name of one that ships with TRL (single_gpu, multi_gpu,
  zero1, zero2, zero3, fsdp1, fsdp2); fsdp2_qlora and multi_node_zero3 are files in the trl-upo repository's
  recipes/accelerate/ (not in the installed package): pass them by path, e.g. recipes/accelerate/fsdp2_qlora.yaml
  (a name is also looked up in ./recipes/accelerate/)."""


def order_recipe_help(parser, script_class: type, config_class: type, extra_dataclasses: tuple[type, ...]) -> None:
    """trl-upo's own options first in ``--help`` (the trainer's UPO fields, then the script's), then TRL's."""
    from trl import DPOConfig, ScriptArguments

    base = next((c for c in config_class.__mro__[1:] if c.__module__.startswith("trl.")), DPOConfig)
    upo = own_fields(config_class, base)
    script = own_fields(script_class, ScriptArguments)
    extra = [f for d in extra_dataclasses for f in own_fields(d, None)]
    titles = ("trl-upo: the command's own options", "trl-upo: the trainer and reward heads",
              "trl-upo: recipe and console")
    put_first(parser, titles[2], "", ["trainer", "console", *[f for f in script if f not in ("trainer", "console")]])
    put_first(parser, titles[1], f"The fields {config_class.__name__} adds to TRL's {base.__name__}.",
              ["reward_heads", *[f for f in upo if f != "reward_heads"]])
    if extra:
        put_first(parser, titles[0], "", extra)
    retitle_rest(parser, f"TRL and transformers options ({base.__name__}, ScriptArguments, ModelConfig, "
                 "DatasetMixtureConfig)", keep=titles)
