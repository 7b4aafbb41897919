"""How long a user waits for the first answer: cold ``santa infill`` with the bundled model, the
same through the per-user daemon, ``santa --help`` and ``santa info``, each as a whole command
(wall time, median of ``--reps``), against the floor of a bare ``python -c "import torch"`` in
the same run and against the targets of issue 18 (cold <= 3.5 s, warm through the daemon <= 0.6 s).

    .venv/bin/python benchmarks/startup.py [--reps 5]

Prints a table and writes ``benchmarks/results/startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "startup.json"
SANTA = [sys.executable, "-m", "santacli"]
SOURCE = b"def add(a, b):\n    return <CURSOR>\n\nprint(add(1, 2))\n"
TARGETS = {"cold infill": 3.5, "daemon infill": 0.6}


def wall(argv: list[str], env: dict[str, str], stdin: bytes | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, input=stdin, capture_output=True, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode()[-300:]}")
    return elapsed


def median_of(reps: int, argv: list[str], env: dict[str, str], stdin: bytes | None = None) -> float:
    return statistics.median(wall(argv, env, stdin) for _ in range(reps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runtime:
        env = {**os.environ, "SANTA_NO_HINT": "1", "SANTA_RUNTIME_DIR": runtime, "SANTA_CONFIG": "/nonexistent"}
        cold_env = env | {"SANTA_DAEMON": "off"}
        infill = [*SANTA, "infill", "--max-tokens", "16"]
        wall(infill, cold_env, SOURCE)  # build the native kernel and warm the file cache once
        load = os.getloadavg()[0]
        rows = {
            "python -c 'import torch' (floor)": median_of(args.reps, [sys.executable, "-c", "import torch"], env),
            "santa --help": median_of(args.reps, [*SANTA, "--help"], env),
            "santa info": median_of(args.reps, [*SANTA, "info"], env),
            "cold infill": median_of(args.reps, infill, cold_env, SOURCE),
        }
        subprocess.run([*SANTA, "daemon", "start"], env=env, check=True, capture_output=True)
        try:
            wall(infill, env, SOURCE)
            rows["daemon infill"] = median_of(args.reps, infill, env, SOURCE)
        finally:
            subprocess.run([*SANTA, "daemon", "stop"], env=env, capture_output=True)
    floor = rows["python -c 'import torch' (floor)"]
    print(f"\nstartup, bundled model, median of {args.reps}; {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'command':<36}{'wall s':>8}{'/ torch import':>16}{'target':>9}{'met':>6}")
    for name, seconds in rows.items():
        target = TARGETS.get(name)
        met = "" if target is None else ("yes" if seconds <= target else "NO")
        print(f"{name:<36}{seconds:>8.2f}{seconds / floor:>16.2f}{target or '':>9}{met:>6}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "startup", "reps": args.reps, "seconds": rows,
                                   "targets": TARGETS, "load_average": load, "cpus": os.cpu_count()}, indent=2)
                       + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
