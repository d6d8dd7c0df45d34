"""Build the embedded default that ``trl-upo train`` (no arguments) runs: writes ``trl_upo/resources/``.

    python scripts/build_quickstart_assets.py [--out trl_upo/resources] [--seed 0] [--sft-steps 150]

- ``tiny-llama/``: a 2-layer Llama (hidden size 64, about 0.1 M parameters) and its word-level tokenizer, warmed up
  with TRL's ``SFTTrainer`` on the synthetic task of ``trl_upo.quickstart_task`` (a prompt names a topic; answers
  are on- or off-topic and about half of them contain the word "very"), saved as safetensors.
- ``quickstart-data/train.jsonl`` (400 pairs) and ``test.jsonl`` (128 pairs): chosen = on-topic, rejected =
  off-topic; "very" appears in each answer with probability 0.5, independently of the label, so preference
  learning alone has no reason to drop it (the designer objective is independent of the labels).

Deterministic on CPU for a given seed and torch version (same data, same initialisation, same SFT steps). The
files are small (about 0.5 MB) and shipped as package data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` as JSON lines."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build(out: Path, seed: int = 0, sft_steps: int = 150) -> None:
    """Build the packaged model and data under ``out`` (the same seeds as ``python -m trl_upo.quickstart``)."""
    import torch

    from trl_upo.quickstart import sft_warmup
    from trl_upo.quickstart_task import preference_rows

    torch.manual_seed(seed)
    model_dir = out / "tiny-llama"
    with tempfile.TemporaryDirectory() as tmp:
        sft = sft_warmup(tmp, seed, sft_steps)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True)
        for name in MODEL_FILES:
            if os.path.exists(os.path.join(sft, name)):
                shutil.copy(os.path.join(sft, name), model_dir / name)
                os.chmod(model_dir / name, 0o644)  # safetensors writes 0600; package data must be world-readable
    data_dir = out / "quickstart-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(data_dir / "train.jsonl", preference_rows(400, seed=seed + 2000))
    write_jsonl(data_dir / "test.jsonl", preference_rows(128, seed=seed + 4000))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB): {sorted(p.name for p in model_dir.iterdir())}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "trl_upo" / "resources"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=150)
    a = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    build(Path(a.out), a.seed, a.sft_steps)


if __name__ == "__main__":
    main()
