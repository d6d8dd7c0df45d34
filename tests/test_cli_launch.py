"""The command owns its process tree (issue 23, item 2): a signal to ``trl-upo train --num_processes N`` reaches the
launcher and the ranks (which torchrun starts in sessions of their own), and no process of the run outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

# A stand-in for `accelerate launch` that behaves like torchrun at its worst: it starts two "ranks" in sessions of
# their own (start_new_session, as torch.distributed.elastic does), and both it and (optionally) the ranks ignore
# SIGTERM. The ranks bind themselves to it with die_with_launcher(), as trl_upo.cli.train's ranks do.
_LAUNCHER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    if os.environ.get("IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rank = (
        "import os, signal, time\\n"
        "from trl_upo.cli.launch import die_with_launcher\\n"
        "die_with_launcher()\\n"
        "if os.environ.get('IGNORE_TERM'): signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
        "open(os.environ['PIDS'], 'a').write(f'{os.getpid()}\\\\n')\\n"
        "time.sleep(600)\\n"
    )
    for r in range(2):
        subprocess.Popen([sys.executable, "-c", rank], env={**os.environ, "LOCAL_RANK": str(r)},
                         start_new_session=True)
    time.sleep(600)
""")


def _start(tmp_path: Path, ignore_term: bool) -> tuple[subprocess.Popen, Path]:
    pids = tmp_path / "pids.txt"
    command = (
        "import sys, os\n"
        "from trl_upo.cli.launch import run_process_tree, PARENT_ENV\n"
        f"env = {{**os.environ, PARENT_ENV: str(os.getpid())}}\n"
        f"sys.exit(run_process_tree([sys.executable, '-c', {_LAUNCHER!r}], env, prog='test'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIDS": str(pids), "TRL_UPO_SIGNAL_GRACE": "2"}
    if ignore_term:
        env["IGNORE_TERM"] = "1"
    proc = subprocess.Popen([sys.executable, "-c", command], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if pids.exists() and len(pids.read_text().split()) == 2:
            return proc, pids
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the stand-in ranks did not start")


def _run_pids(proc: subprocess.Popen, pids: Path) -> list[int]:
    from trl_upo.cli.launch import descendants

    return sorted({proc.pid, *descendants(proc.pid), *map(int, pids.read_text().split())})


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _wait_all_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tree read from /proc")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_command_ends_launcher_and_ranks(tmp_path, signum):
    """Ranks in sessions of their own that ignore SIGTERM, under a launcher that ignores it too: all are gone within
    the grace period after the signal, and the command exits with 128 + signal."""
    proc, pids = _start(tmp_path, ignore_term=True)
    run = _run_pids(proc, pids)
    assert len(run) >= 4  # command, launcher, two ranks
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 128 + signum
    assert _wait_all_gone(run, 30) == []
    assert f"got {signal.Signals(signum).name}" in proc.stderr.read()


def test_ranks_die_with_a_killed_command(tmp_path):
    """SIGKILL cannot be forwarded: the launcher dies with the command and the ranks with the launcher
    (PR_SET_PDEATHSIG)."""
    proc, pids = _start(tmp_path, ignore_term=False)
    run = _run_pids(proc, pids)
    proc.kill()
    proc.wait(timeout=30)
    assert _wait_all_gone(run, 30) == []


def test_relaunched_ranks_do_not_get_the_current_directory_on_sys_path(tmp_path, monkeypatch):
    """`python -m` puts the current directory first; the launched ranks run with PYTHONSAFEPATH instead."""
    from trl_upo.cli import launch

    seen = {}
    monkeypatch.setattr(launch, "run_process_tree", lambda cmd, env, prog=None: seen.update(env) or 0)
    monkeypatch.setattr(launch, "build_launch_args", lambda options, use_cpu: ["--num_processes", "2"])
    assert launch.relaunch(["--max_steps", "1"], [("num_processes", 2)], use_cpu=True, prog="t") == 0
    assert seen["PYTHONSAFEPATH"] == "1" and seen[launch.PARENT_ENV] == str(os.getpid())


@pytest.mark.slow
def test_sigterm_to_a_two_process_train_leaves_no_process_of_the_run(tmp_path):
    """The real thing: `trl-upo train --num_processes 2` on CPU, SIGTERM once both ranks run; within 30 s no process
    of the run is alive (before: accelerate launch and both ranks kept training as orphans)."""
    from trl_upo.cli.launch import descendants

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trl_upo.cli", "train", "--num_processes", "2", "--use_cpu", "true", "--max_steps",
         "100000", "--report_before_after", "false", "--output_dir", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    run: set[int] = set()
    while time.monotonic() < deadline:
        run |= set(descendants(proc.pid))
        if len(run) >= 3 and (out / "train_started").exists() or len(run) >= 3 and time.monotonic() > deadline - 200:
            break
        time.sleep(0.5)
    assert len(run) >= 3, "launcher and two ranks did not start"
    time.sleep(5)
    run |= set(descendants(proc.pid))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert _wait_all_gone(sorted(run), 30) == []
