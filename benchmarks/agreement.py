"""Greedy agreement of santa's reduced-precision modes with fp32, on a trained model.

For ``--prompts`` FIM prompts built from held-out standard-library lines (the same lines as
``fim_eval.py``: prefix = everything above the line, suffix = everything below), each mode
(``bf16``, ``int8``, and fp32 with PyTorch decode steps as a control) generates ``--tokens``
greedy tokens without stopping, and is compared with fp32 (native decode):

* identical: the share of prompts whose whole token sequence equals fp32's;
* first token: the share whose first generated token equals fp32's;
* common prefix: the mean number of leading tokens equal to fp32's.

Prints a table and writes JSON (``--out``).

    python benchmarks/agreement.py --model tiny --prompts 200 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fim_eval import heldout_lines

from santacli import Engine
from santacli.completion import CompletionOptions

MODES = {
    "fp32 (PyTorch decode)": {"decode": "pytorch"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"quantize": "int8"},
}


def greedy_ids(engine: Engine, prefix: str, suffix: str, tokens: int) -> list[int]:
    prompt = engine.build_prompt(prefix, suffix, CompletionOptions(max_tokens=tokens))
    return engine.generate(prompt.ids, max_new_tokens=tokens, stop_at_eos=False)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/agreement.json"))
    args = ap.parse_args()

    rows = heldout_lines(args.prompts, args.seed)
    reference = Engine.load(args.model, dtype="float32")
    started = time.perf_counter()
    ref = [greedy_ids(reference, prefix, suffix, args.tokens) for _, prefix, _, suffix in rows]
    report: dict[str, object] = {"model": args.model, "prompts": len(rows), "tokens": args.tokens,
                                 "reference": f"fp32, decode {reference.info.decode}",
                                 "command": shlex.join(["python", *sys.argv]),
                                 "date": time.strftime("%Y-%m-%d", time.gmtime()), "modes": {}}
    print(f"model {args.model}: {len(rows)} held-out FIM prompts, {args.tokens} greedy tokens each, "
          f"against fp32 (decode {reference.info.decode})")
    print(f"  {'mode':<22} {'identical':>10} {'first token':>12} {'common prefix':>14}")
    for label, load in MODES.items():
        engine = Engine.load(args.model, **load)
        got = [greedy_ids(engine, prefix, suffix, args.tokens) for _, prefix, _, suffix in rows]
        same = sum(a == b for a, b in zip(got, ref, strict=True)) / len(rows)
        first = sum(a[:1] == b[:1] for a, b in zip(got, ref, strict=True)) / len(rows)
        prefix_len = sum(common_prefix(a, b) for a, b in zip(got, ref, strict=True)) / len(rows)
        report["modes"][label] = {"load": load, "decode": engine.info.decode, "identical": same,  # type: ignore[index]
                                  "first_token": first, "mean_common_prefix": prefix_len}
        print(f"  {label:<22} {same:>10.1%} {first:>12.1%} {prefix_len:>9.1f} / {args.tokens}")
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"  wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
