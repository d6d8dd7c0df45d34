"""Fingerprints that key the score cache and the resume check are the same in every process and follow what decides
the scores: a set's order (hash seed) and an object's memory address do not count; in the script being run, only the
definitions a reward function uses count; a callable object's state is what it pickles as."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.helpers import ROOT

SCRIPT = textwrap.dedent('''\
    import sys
    from trl_upo.heads.function import FunctionHead

    LIMIT = 3
    BANNED = {"very", "really", "quite", "so"}


    def helper(text):
        return len(text) > LIMIT and not any(w in BANNED for w in text.split())


    def reward(completions, **kwargs):
        return [float(helper(c)) for c in completions]


    class Holder:
        pass


    def make(words):
        banned = set(words)
        holder = Holder()
        holder.words = banned

        def closure(completions, **kwargs):
            return [float(all(w not in banned for w in c.split())) for c in completions]

        closure.holder = holder
        return closure


    MAX_STEPS = 10
    print(FunctionHead(reward).fingerprint())
    print(FunctionHead(make(["good", "bad", "ugly", "fine"])).fingerprint())
''')


def _fingerprints(tmp_path, source: str, seed: str) -> list[str]:
    path = tmp_path / f"script{abs(hash((source, seed)))}.py"
    path.write_text(source)
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()


def test_function_fingerprints_do_not_depend_on_the_process_or_unused_script_lines(tmp_path):
    base = _fingerprints(tmp_path, SCRIPT, "1")
    assert _fingerprints(tmp_path, SCRIPT, "2") == base  # sets in a closure: sorted, whatever the hash seed
    unrelated = SCRIPT.replace("MAX_STEPS = 10", "MAX_STEPS = 500\nRESUME = True")
    assert _fingerprints(tmp_path, unrelated, "3") == base  # the rest of the training script does not count
    used_constant = SCRIPT.replace("LIMIT = 3", "LIMIT = 4")
    changed = _fingerprints(tmp_path, used_constant, "1")
    assert changed[0] != base[0]  # a constant the helper reads counts
    used_helper = SCRIPT.replace("len(text) > LIMIT", "len(text) >= LIMIT")
    assert _fingerprints(tmp_path, used_helper, "1")[0] not in (base[0], changed[0])  # a helper it calls counts


def test_an_object_with_the_default_repr_is_described_by_class_and_attributes():
    from trl_upo.fingerprints import stable_repr

    class Settings:
        def __init__(self, words):
            self.words = set(words)

    a, b = Settings(["x", "y"]), Settings(["y", "x"])
    assert stable_repr(a) == stable_repr(b) and "0x" not in stable_repr(a)
    assert stable_repr(a) != stable_repr(Settings(["x"]))


def test_a_reward_factory_keeps_its_fingerprint_after_its_first_call():
    from trl_upo.cli.rewards import RewardFactory
    from trl_upo.heads.function import FunctionHead

    def factory(n):
        return RewardFactory("trl.rewards:get_soft_overlong_punishment", {"max_completion_len": n,
                                                                          "soft_punish_cache": 2})

    fn = factory(8)
    head = FunctionHead(fn)
    before = head.fingerprint()
    fn(completion_ids=[[1, 2, 3]])  # builds and caches the reward function inside the object
    assert head.fingerprint() == before == FunctionHead(factory(8)).fingerprint()
    assert FunctionHead(factory(9)).fingerprint() != before
