"""Streaming scoring at scale: a synthetic stream of preference pairs scored lazily by ``trl_upo.scoring.score_stream``
with three text heads (length, lexicon, readability), against map-style ``score_dataset`` on the same rows.

    python benchmarks/stream_scale.py [--sizes 10000 100000 1000000] [--map-sizes 10000 100000] [--head-set text]
    python benchmarks/stream_scale.py --short        # the CI check: 300 pairs, both modes
    python benchmarks/stream_scale.py --sizes 1000000 --map-sizes --json stream-1e6.json   # three text heads, 10^6

A long run prints a progress line to stderr every ``--progress`` rows (default 100,000: pairs so far, seconds, peak RSS)
and rewrites ``--json`` after every finished measurement, so an interrupted run keeps what it measured.

Every measurement runs in a fresh child process (so its peak RSS, ``ru_maxrss``, is its own), one torch thread, score
cache off, progress bars off. The pairs are generated on the fly (responses of 60-240 words from a 2,000-word
vocabulary, seeded per row): the stream never holds more than a batch; the map-style run first materialises the rows
as an Arrow dataset (``Dataset.from_generator`` into a temporary directory), then scores them. Reported per run: peak
RSS and RSS after imports (MB), the time to the first scored row (stream: one batch; map-style: the whole split,
since training cannot start before ``score_dataset`` returns), the total time, and throughput in pairs per second.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TQDM_DISABLE", "1")

HEADS = [
    {"name": "len", "type": "length"},
    {"name": "lex", "type": "lexicon", "params": {"encourage": ["clear", "exact"], "avoid": ["very", "really"]}},
    {"name": "read", "type": "readability"},
]
#: ``--head-set``: the three text heads, or the length head alone (memory at sizes the three take too long for).
HEAD_SETS = {"text": HEADS, "length": HEADS[:1]}
VOCAB = [f"w{i}" for i in range(1990)] + ["clear", "exact", "very", "really", "a", "the", "of", "is", "it", "so"]


def pairs(n: int, seed: int = 0):
    """``n`` synthetic pairs: a prompt, and chosen and rejected responses of 60-240 words (sentences of 12)."""
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)

        def text() -> str:
            words = rng.choices(VOCAB, k=rng.randint(60, 240))
            return " ".join(" ".join(words[j : j + 12]) + "." for j in range(0, len(words), 12))

        yield {"prompt": f"Question {i}: explain w{i % 1990}.", "chosen": text(), "rejected": text()}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, n: int, batch_size: int, out: str, head_set: str = "text", progress: str = "100000") -> None:
    """One measurement in this process: ``mode`` stream or map, ``n`` pairs; writes ``out`` (JSON)."""
    import torch
    from datasets import Dataset, IterableDataset

    from trl_upo.heads import build_head, parse_head_specs
    from trl_upo.scoring import score_dataset, score_stream

    torch.set_num_threads(1)
    specs = parse_head_specs(HEAD_SETS[head_set])
    heads = [build_head(s) for s in specs]
    for head in heads:  # lazy resources (the readability head's word lists) read before the clock starts
        head.score(["p"], ["Warm up."], role="chosen", columns={})
    rss_start, start = _rss_mb(), time.perf_counter()
    rec: dict = {"mode": mode, "pairs": n, "heads": head_set, "rss_mb_after_imports": rss_start}
    if mode == "stream":
        stream = IterableDataset.from_generator(pairs, gen_kwargs={"n": n})
        scored = score_stream(stream, heads, specs, batch_size=batch_size, use_cache=False)
        seen, total = 0, 0.0
        for row in scored:
            if seen == 0:
                rec["first_row_s"] = time.perf_counter() - start
            seen += 1
            total += row["upo_len_chosen"]
            if int(progress) and seen % int(progress) == 0:
                print(f"stream {head_set} {n}: {seen} pairs, {time.perf_counter() - start:.1f} s, peak RSS "
                      f"{_rss_mb():.1f} MB", file=sys.stderr, flush=True)
        rec["rows"] = seen
    else:
        with tempfile.TemporaryDirectory() as work:
            data = Dataset.from_generator(pairs, gen_kwargs={"n": n}, cache_dir=work)
            rec["materialise_s"] = time.perf_counter() - start
            scored, _ = score_dataset(data, heads, specs, split="train", batch_size=batch_size, use_cache=False)
            rec["rows"] = len(scored)
            rec["first_row_s"] = time.perf_counter() - start
            del scored, data
    rec["total_s"] = time.perf_counter() - start
    rec["pairs_per_s"] = n / rec["total_s"]
    rec["peak_rss_mb"] = _rss_mb()
    Path(out).write_text(json.dumps(rec))


def measure(mode: str, n: int, batch_size: int, work: str, head_set: str = "text", progress: int = 100_000) -> dict:
    """Run :func:`child` in a fresh process and read its record (its progress lines go to this process's stderr)."""
    out = os.path.join(work, f"{mode}-{n}-{head_set}.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode, str(n), str(batch_size), out,
                    head_set, str(progress)],
                   env=env, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (see the module docstring); returns and prints the results."""
    if argv and argv[0] == "--child":
        child(argv[1], int(argv[2]), int(argv[3]), argv[4], *argv[5:7])
        return {}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000], help="stream sizes (pairs)")
    p.add_argument("--map-sizes", type=int, nargs="*", default=[10_000, 100_000], help="map-style sizes (pairs)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per head call (upo_score_batch_size)")
    p.add_argument("--head-set", choices=sorted(HEAD_SETS), default="text",
                   help="text: length, lexicon and readability; length: the length head alone")
    p.add_argument("--short", action="store_true", help="CI check: 300 pairs, both modes")
    p.add_argument("--progress", type=int, default=100_000, help="a progress line every N rows of a stream (0: none)")
    p.add_argument("--json", help="write the results here (rewritten after every measurement)")
    args = p.parse_args(argv)
    if args.short:
        args.sizes, args.map_sizes, args.batch_size = [300], [300], 64
    results: dict = {"cpus": os.cpu_count(), "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                     "batch_size": args.batch_size, "heads": args.head_set, "runs": []}
    with tempfile.TemporaryDirectory() as work:
        for n in sorted(set(args.sizes) | set(args.map_sizes)):
            for mode, sizes in (("stream", args.sizes), ("map", args.map_sizes)):
                if n in sizes:
                    results["runs"].append(measure(mode, n, args.batch_size, work, args.head_set, args.progress))
                    print(json.dumps(results["runs"][-1]), flush=True)
                    if args.json:  # an interrupted run keeps what it measured
                        Path(args.json).write_text(json.dumps(results, indent=2))
    results["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    from benchmarks.scoring_scale import emit

    return emit(results, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
