"""Decoding when other processes keep cores busy: tokens/s of greedy decoding with one thread,
with every core, and with santa's default (the cores other processes leave free, see
santacli/cores.py), on an idle machine, with one core kept busy and with all of them busy.

The target (issue 18): the default is never below 0.8x of one thread. Prints a table of
tokens/s and ratios to one thread; writes ``benchmarks/results/threads.json``.

    .venv/bin/python benchmarks/threads.py [--tokens 64] [--quantize int8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "threads.json"
SHAPE = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}
PROMPT = "import os\n\ndef walk(path):\n    for root, dirs, files in os.walk(path):\n        "


def busy(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quantize", default=None, help="none or int8")
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import write_checkpoint
    from santacli.engine import Engine

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp) / "m", seed=0, **SHAPE)
        engine = Engine.load(str(folder), quantize=args.quantize)
        rows: dict[str, dict[str, float]] = {}
        for load in range(cores + 1):
            hogs = busy(load)
            try:
                time.sleep(1.0)
                row = {}
                for label, threads in (("1 thread", 1), (f"{cores} threads", cores), ("default", None)):
                    engine.threads = threads  # None: santa's own choice
                    engine.prompt_cache.clear()
                    started = time.perf_counter()
                    result = engine.complete(PROMPT, max_tokens=args.tokens, mode="full").result
                    seconds = time.perf_counter() - started
                    row[label] = result.generated_tokens / seconds
                rows[f"{load} of {cores} cores busy"] = row
            finally:
                for hog in hogs:
                    hog.kill()
        engine.threads = None
    print(f"\ngreedy decode, {SHAPE} ({args.quantize or 'fp32'}), {args.tokens} tokens; torch {torch.__version__}, "
          f"decode {engine.info.decode}")
    labels = list(next(iter(rows.values())))
    print(f"{'machine':<22}" + "".join(f"{label:>14}" for label in labels) + f"{'default / 1':>13}")
    for name, row in rows.items():
        print(f"{name:<22}" + "".join(f"{row[label]:>12.1f}/s" for label in labels)
              + f"{row['default'] / row['1 thread']:>13.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "threads", "shape": SHAPE, "quantize": args.quantize,
                                   "tokens_per_s": rows, "target_default_over_one_thread": 0.8}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
