"""FIM evaluation for any model santa can load.

Two tasks, greedy, ``mode=line``:

* held-out lines: single-line FIM exact match on lines of files that santa-tiny never saw in
  training (its ``heldout_files.json``, read from this interpreter's standard library); prefix =
  everything above the line, suffix = everything below it. A trivial baseline ("repeat the
  previous non-blank line") is scored on the same lines.
* HumanEval single-line infilling (``../shared/data``): exact match with the canonical line and
  pass rate: the filled-in program runs the task's tests in a subprocess with a timeout.

Prints a table and writes JSON (``--out``).

    python benchmarks/fim_eval.py --model tiny --lines 500 --humaneval 1033
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from santacli import Engine
from santacli.catalog import BUNDLED_DIR

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def heldout_lines(count: int, seed: int) -> list[tuple[str, str, str, str]]:
    """(file, prefix, line, suffix) for ``count`` random non-trivial held-out lines."""
    files = json.loads((BUNDLED_DIR / "heldout_files.json").read_text())
    if isinstance(files, dict):
        files = files.get("files", [])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for rel in files:
        path = stdlib / rel
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if len(line.strip()) >= 4 and not line.strip().startswith("#"):
                candidates.append((rel, "\n".join(lines[:i]) + "\n", line, "\n" + "\n".join(lines[i + 1:])))
    random.Random(seed).shuffle(candidates)
    return candidates[:count]


def previous_line_baseline(prefix: str) -> str:
    for line in reversed(prefix.rstrip("\n").split("\n")):
        if line.strip():
            return line
    return ""


def run_tests(program: str, timeout: float) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(program)
    try:
        proc = subprocess.run([sys.executable, handle.name], capture_output=True, timeout=timeout,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        return proc.returncode == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        os.unlink(handle.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--lines", type=int, default=500, help="held-out lines to score (0: skip)")
    ap.add_argument("--humaneval", type=int, default=1033, help="HumanEval infilling tasks (0: skip)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--fim-mode", default="psm")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fim_eval.json"))
    args = ap.parse_args()

    engine = Engine.load(args.model, quantize=args.quantize)
    report: dict[str, object] = {"model": args.model, "fim_mode": args.fim_mode, "max_tokens": args.max_tokens,
                                 "python": sys.version.split()[0],
                                 "command": shlex.join(["python", *sys.argv]),
                                 "date": time.strftime("%Y-%m-%d", time.gmtime())}
    started = time.perf_counter()

    def fill(prefix: str, suffix: str) -> str:
        return engine.infill(prefix, suffix, mode="line", max_tokens=args.max_tokens,
                             fim_mode=args.fim_mode).text()

    if args.lines:
        rows = heldout_lines(args.lines, args.seed)
        hits = base = 0
        for _, prefix, line, suffix in rows:
            # The cursor sits at the start of the line: the model writes its indentation too.
            hits += fill(prefix, suffix).strip() == line.strip()
            base += previous_line_baseline(prefix).strip() == line.strip()
        report["heldout"] = {"lines": len(rows), "exact_match": hits / max(len(rows), 1),
                             "baseline_repeat_previous_line": base / max(len(rows), 1)}

    data = SHARED / "HumanEval-SingleLineInfilling.jsonl.gz"
    if args.humaneval and data.is_file():
        with gzip.open(data, "rt", encoding="utf-8") as handle:
            tasks = [json.loads(line) for line in handle][: args.humaneval]
        exact = passed = 0
        for task in tasks:
            middle = fill(task["prompt"], task["suffix"])
            exact += middle.strip() == task["canonical_solution"].strip()
            program = (task["prompt"] + middle + "\n" + task["suffix"] + "\n" + task["test"]
                       + f"\ncheck({task['entry_point']})\n")
            passed += run_tests(program, args.timeout)
        report["humaneval_single_line"] = {"tasks": len(tasks), "exact_match": exact / len(tasks),
                                           "pass_rate": passed / len(tasks)}
    elif args.humaneval:
        report["humaneval_single_line"] = "skipped: ../shared/data is not present"
    report["seconds"] = round(time.perf_counter() - started, 1)

    print(f"model {args.model} ({args.fim_mode}, greedy, mode=line)")
    if "heldout" in report:
        h = report["heldout"]
        print(f"  held-out lines       n={h['lines']:<5} exact match {h['exact_match']:.1%}   "
              f"baseline (previous line) {h['baseline_repeat_previous_line']:.1%}")
    he = report.get("humaneval_single_line")
    if isinstance(he, dict):
        print(f"  HumanEval 1-line     n={he['tasks']:<5} exact match {he['exact_match']:.1%}   "
              f"pass rate {he['pass_rate']:.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"  wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
