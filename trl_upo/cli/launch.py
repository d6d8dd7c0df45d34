"""Several processes for ``trl-upo train`` (and ``trl-upo score``): ``accelerate launch`` options in a recipe or on the
command line make the command re-launch itself as ``accelerate launch <those options> -m trl_upo.cli.train <the other
arguments>`` (``-m trl_upo.cli.score`` for scoring: :func:`relaunch`'s ``module``).

Launch options are the keys no argument dataclass takes but ``accelerate launch`` does (:func:`launch_keys`, read
from accelerate's own parser), plus ``accelerate_config``. A process that already runs under a launcher
(:func:`under_launcher`) trains instead of launching again.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trl_upo.cli.common import UsageError, closest, split_leftovers
from trl_upo.resources import RESOURCES_DIR

#: Set in the environment of processes this command launches, so that they train instead of launching again.
LAUNCHED_ENV = "TRL_UPO_LAUNCHED"
#: The module ``accelerate launch`` runs for ``trl-upo train`` (:func:`relaunch`'s default).
TRAIN_MODULE = "trl_upo.cli.train"
# Set by `accelerate launch` (every launcher: simple, multi-GPU, DeepSpeed, FSDP) or by torchrun in its workers.
_LAUNCHER_ENV = ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
# `accelerate launch` options that would break the re-launch of this same entry point.
_NOT_LAUNCH_KEYS = {"help", "training_script", "training_script_args", "module", "no_python", "env"}


def launch_keys() -> dict[str, bool]:
    """``accelerate launch`` options a recipe or flag may give, as ``{key: takes_a_value}``; plus
    ``accelerate_config`` (a file, or a name: see :func:`resolve_accelerate_config`)."""
    from accelerate.commands.launch import launch_command_parser

    keys: dict[str, bool] = {"accelerate_config": True}
    for action in launch_command_parser()._actions:
        if action.dest in _NOT_LAUNCH_KEYS or not action.option_strings:
            continue
        for opt in action.option_strings:
            if opt.startswith("--"):
                keys[opt[2:].replace("-", "_")] = action.nargs != 0
    return keys


def launch_options(config_leftovers: list[str], cli_leftovers: list[str]) -> list[tuple[str, Any]]:
    """The launch options among the tokens the argument parser left over, recipe first, then flags (so flags win).

    Args:
        config_leftovers: Leftover ``--key value`` tokens of the recipe (every key has a value).
        cli_leftovers: Leftover tokens of the command line.

    Returns:
        ``(key, value)`` pairs; keys that are no launch option are left out (they were reported before).
    """
    keys = launch_keys()
    from_yaml = split_leftovers(config_leftovers, keys, from_yaml=True)[0]
    return from_yaml + split_leftovers(cli_leftovers, keys, from_yaml=False)[0]


def resolve_accelerate_config(name: str) -> str:
    """Path of an accelerate config given as a file, or as the name of one in ``recipes/accelerate/`` (of the
    current directory or of the source tree this package runs from) or in TRL's ``accelerate_configs``.

    From an installed package (a wheel holds only ``trl_upo/resources``) the names are TRL's (``single_gpu``,
    ``multi_gpu``, ``zero1``, ``zero2``, ``zero3``, ``fsdp1``, ``fsdp2``) and those in ``./recipes/accelerate/``;
    the repository's ``fsdp2_qlora`` and ``multi_node_zero3`` are found by name only in a source checkout, else
    they are passed as files (``recipes/accelerate/fsdp2_qlora.yaml``).

    Args:
        name: A file path, or a config name with or without ``.yaml``.

    Returns:
        The path of the config file.

    Raises:
        UsageError: neither a file nor a known name (the message lists the known names).
    """
    import importlib.resources as resources

    if Path(name).is_file():
        return str(Path(name).resolve())
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    searched = []
    for base in (Path.cwd() / "recipes" / "accelerate", RESOURCES_DIR.parents[1] / "recipes" / "accelerate"):
        candidate = base / f"{stem}.yaml"
        searched.append(str(base))
        if candidate.is_file():
            return str(candidate)
    trl_dir = resources.files("trl.accelerate_configs")
    candidate = trl_dir.joinpath(f"{stem}.yaml")
    if candidate.is_file():
        return str(candidate)
    names = sorted({p.stem for b in searched if Path(b).is_dir() for p in Path(b).glob("*.yaml")}
                   | {p.name[:-5] for p in trl_dir.iterdir() if p.name.endswith(".yaml")})
    match = closest(stem, names)
    hint = f" Did you mean {match!r}?" if match else ""
    raise UsageError(
        f"accelerate_config {name!r} is neither a file nor a known config.{hint} Known names: {names} (from "
        f"{', '.join(searched)} and TRL's accelerate_configs)."
    )


def under_launcher() -> bool:
    """Whether this process was started by ``accelerate launch`` / torchrun (or re-launched by this command)."""
    return any(k in os.environ for k in (LAUNCHED_ENV, *_LAUNCHER_ENV))


def build_launch_args(options: list[tuple[str, Any]], use_cpu: bool) -> list[str]:
    """``accelerate launch`` arguments for the launch options of a recipe and its flags (flags last, so they win).

    On CPU (``use_cpu: true``, or no CUDA device), several processes need the multi-GPU launcher (torchrun), with
    the training processes on CPU: ``accelerate launch --cpu --num_processes 2`` starts ONE process. So with
    ``num_processes > 1`` and no distributed mode given, ``--multi_gpu`` is added and ``--cpu`` dropped.

    Args:
        options: ``(key, value)`` launch options in order (recipe first, then flags); boolean options take a
            boolean or a ``"true"``/``"false"`` string.
        use_cpu: The run's ``use_cpu`` setting.

    Returns:
        The arguments of ``accelerate launch`` before the training module.
    """
    import torch

    merged: dict[str, Any] = {}
    for key, value in options:
        merged[key] = value
    args: list[str] = []
    if "accelerate_config" in merged:
        args += ["--config_file", resolve_accelerate_config(str(merged.pop("accelerate_config")))]
    num_processes = int(merged.get("num_processes", 1) or 1)
    on_cpu = use_cpu or _truthy(merged.get("cpu", False)) or not torch.cuda.is_available()
    distributed = any(_truthy(merged.get(k, False)) for k in ("multi_gpu", "use_deepspeed", "use_fsdp", "tpu"))
    if num_processes > 1 and on_cpu and not distributed and "--config_file" not in args:
        merged.pop("cpu", None)
        merged["multi_gpu"] = True
        if int(merged.get("num_machines", 1) or 1) == 1:
            merged.setdefault("num_machines", 1)
        merged.setdefault("mixed_precision", "no")
        merged.setdefault("dynamo_backend", "no")
    takes_value = launch_keys()
    for key, value in merged.items():
        if takes_value.get(key, True):
            args += [f"--{key}", str(value)]
        elif _truthy(value):
            args.append(f"--{key}")
    return args


def _truthy(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def strip_launch_args(argv: list[str], options: list[tuple[str, Any]]) -> list[str]:
    """The command's arguments without the launch options in ``options`` (and their values).

    Args:
        argv: The command's arguments.
        options: The launch options found in them (and in the recipe).

    Returns:
        What the launched processes get.
    """
    keys = {k for k, _ in options}
    takes_value = launch_keys()
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        key = tok[2:].partition("=")[0].replace("-", "_") if tok.startswith("--") else None
        if key in keys:
            has_next = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            boolean_value = has_next and argv[i + 1].lower() in ("true", "false")
            consumes = "=" not in tok and has_next and (takes_value.get(key, True) or boolean_value)
            i += 2 if consumes else 1
            continue
        out.append(tok)
        i += 1
    return out


def relaunch(
    argv: list[str], options: list[tuple[str, Any]], use_cpu: bool, prog: str | None = None, module: str = TRAIN_MODULE
) -> int:
    """Start ``module`` (the command's own entry module, ``trl_upo.cli.train`` by default) under ``accelerate launch``
    with the launch options; return its exit code. The launched processes see ``TRL_UPO_LAUNCHED=1``
    (:func:`under_launcher`) and do the work instead of launching again.

    Args:
        argv: This command's arguments; the launch options are removed from them, the rest is passed on.
        options: The launch options (see :func:`launch_options`).
        use_cpu: The run's ``use_cpu`` setting (see :func:`build_launch_args`).
        prog: Program name for the printed command.
        module: The module each launched process runs (``python -m`` style), e.g. ``trl_upo.cli.score``.

    Returns:
        The exit code of ``accelerate launch``.
    """
    launch_args = build_launch_args(options, use_cpu)
    script_args = strip_launch_args(argv, options)
    from accelerate.commands.launch import launch_command_parser

    # Fail on a bad launch value here, with accelerate's own message, rather than in a subprocess.
    launch_command_parser().parse_args([*launch_args, "-m", module, *script_args])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "-m", module, *script_args]
    print(f"{prog}: launching: accelerate launch {shlex.join(cmd[3:])}", flush=True)
    # PYTHONSAFEPATH: `python -m` would put the current directory first on each rank's sys.path (see trl_upo.cli).
    env = {**os.environ, LAUNCHED_ENV: "1", PARENT_ENV: str(os.getpid()), "PYTHONSAFEPATH": "1"}
    return run_process_tree(cmd, env, prog=prog)


#: The pid of the command that launched this rank's launcher (set by :func:`relaunch`).
PARENT_ENV = "TRL_UPO_LAUNCHER_PARENT"
#: Seconds the launcher and the ranks get to end after a forwarded signal before they are killed.
GRACE_ENV = "TRL_UPO_SIGNAL_GRACE"
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def run_process_tree(cmd: list[str], env: dict[str, str], prog: str | None = None) -> int:
    """Run the launcher ``cmd`` as the owner of its whole process tree; return its exit code.

    The launcher starts in a process group of its own and dies with this process (``PR_SET_PDEATHSIG``); each rank
    binds itself to the launcher the same way (:func:`die_with_launcher`: torchrun starts every rank in a session of
    its own, so no process-group signal reaches them). SIGTERM, SIGINT and SIGHUP sent to this command are forwarded
    to the launcher's group (torchrun then stops the ranks); whatever is still alive after the grace period
    (:data:`GRACE_ENV`, default 15 s), launcher or rank, is killed. The exit code is then ``128 + signal``.

    Args:
        cmd: The launcher's command line.
        env: Its environment.
        prog: Program name for the message printed on a signal.

    Returns:
        The launcher's exit code, or ``128 + signal number`` after a forwarded signal.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    received: list[int] = []
    tree: dict[int, str] = {}  # pid -> start time, so that a reused pid is never signalled

    def forward(signum, _frame):
        if not received:
            print(f"{prog or 'trl-upo'}: got {signal.Signals(signum).name}: stopping the launcher and its processes "
                  f"(killed after {_grace():g} s).", file=sys.stderr, flush=True)
        received.append(signum)
        _track(proc.pid, tree)
        _signal_group(proc.pid, signum)
        _signal_tree(tree, signum)

    previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        code = _wait_tree(proc, tree, received)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 + int(received[0]) if received else code


def _grace() -> float:
    return float(os.environ.get(GRACE_ENV, "15"))


def _wait_tree(proc: subprocess.Popen, tree: dict[int, str], received: list[int]) -> int:
    """Wait for the launcher, keeping track of its descendants; after a signal, give the tree the grace period, then
    kill what is left of it. A rank still alive after its launcher ended is killed too."""
    deadline = None
    while True:
        _track(proc.pid, tree)
        code = proc.poll()
        if received and deadline is None:
            deadline = time.monotonic() + _grace()
        if code is not None and not any(_alive(p, t) for p, t in tree.items()):
            return code
        if code is not None and deadline is None:
            deadline = time.monotonic() + _grace()  # the launcher ended and left ranks behind
        if deadline is not None and time.monotonic() > deadline:
            _signal_group(proc.pid, signal.SIGKILL)
            _signal_tree(tree, signal.SIGKILL)
            return proc.wait()
        time.sleep(0.2 if deadline is not None else 0.5)


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (children, their children, ...), read from ``/proc`` (Linux; empty
    elsewhere). Ranks in sessions of their own are found too: the walk follows parents, not groups."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _track(root: int, tree: dict[int, str]) -> None:
    for pid in descendants(root):
        fields = _stat(pid)
        if fields is not None and pid not in tree:
            tree[pid] = fields[19]  # start time since boot


def _alive(pid: int, start: str | None = None) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and (start is None or fields[19] == start)


def _signal_tree(tree: dict[int, str], signum: int) -> None:
    for pid, start in tree.items():
        if _alive(pid, start):
            _signal_pid(pid, signum)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _set_pdeathsig(signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent thread ends; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die_with_parent() -> None:  # runs in the launcher between fork and exec
    _set_pdeathsig(signal.SIGTERM)


def die_with_launcher() -> None:
    """In a rank this command launched (:func:`relaunch`): end with the launcher (``PR_SET_PDEATHSIG``), so that no
    rank outlives the run when the launcher is killed. Without a launcher parent of this command, nothing is done."""
    if PARENT_ENV not in os.environ or "LOCAL_RANK" not in os.environ:
        return
    parent = os.getppid()
    _set_pdeathsig(signal.SIGTERM)
    if parent == 1 or os.getppid() != parent:  # the launcher died before the binding took effect
        os.kill(os.getpid(), signal.SIGTERM)
