"""santa serve under a bounded hostile load on loopback: does it keep answering correctly, and
does its memory stay flat?

Starts ``santa serve`` (the bundled model, or ``--model``) in a subprocess, asks it for a
reference completion, then runs rounds of mixed clients at once:

- ordinary ones (``/infill``, ``/v1/completions``, ``/generate``, streaming and not),
- clients that disconnect mid-stream,
- slow clients that drip their headers or body (the server cuts them off),
- malformed bodies (must get 4xx, never 5xx).

After each round it records the server's resident memory (``/proc/PID/status``); at the end it
asks the reference question again, which must get the same answer. Prints a table and writes
``benchmarks/results/server_load.json``.

    .venv/bin/python benchmarks/server_load.py [--model PATH] [--rounds 5] [--clients 40]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "server_load.json"
PREFIX, SUFFIX = "def fib(n):\n    ", "\n\nprint(fib(10))\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ordinary(base: str, i: int, out: Counter[str]) -> None:
    kind = i % 4
    try:
        if kind == 0:
            r = httpx.post(f"{base}/infill", json={"prefix": PREFIX + f"# {i}\n", "suffix": SUFFIX,
                                                   "max_tokens": 8}, timeout=120)
        elif kind == 1:
            r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": PREFIX, "suffix": SUFFIX,
                                                           "max_tokens": 8, "temperature": 0}, timeout=120)
        elif kind == 2:
            r = httpx.post(f"{base}/generate", json={"inputs": PREFIX, "parameters": {"max_new_tokens": 8}},
                           timeout=120)
        else:
            with httpx.stream("POST", f"{base}/infill", json={"prefix": PREFIX, "suffix": SUFFIX, "max_tokens": 8,
                                                              "stream": True}, timeout=120) as r:
                r.read()
        out[f"ok {r.status_code}"] += 1
    except httpx.HTTPError as exc:
        out[f"error {type(exc).__name__}"] += 1


def disconnecting(base: str, out: Counter[str]) -> None:
    try:
        with httpx.stream("POST", f"{base}/infill", json={"prefix": PREFIX, "suffix": SUFFIX, "max_tokens": 64,
                                                          "stream": True}, timeout=120) as r:
            for _ in r.iter_bytes():
                break  # hang up after the first event
        out["disconnected"] += 1
    except httpx.HTTPError as exc:
        out[f"disconnect error {type(exc).__name__}"] += 1


def slow(port: int, out: Counter[str], *, body: bool) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            if body:
                sock.sendall(b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n{")
            else:
                sock.sendall(b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            answer = sock.recv(100)
        out[f"slow {'body' if body else 'headers'} -> {answer[9:12].decode() or 'closed'}"] += 1
    except OSError as exc:
        out[f"slow error {type(exc).__name__}"] += 1


def malformed(base: str, i: int, out: Counter[str]) -> None:
    bodies = [b"{", b'{"prefix": "\\ud800"}', b"[" * 5000, b'{"prefix": 3}', b'{"max_tokens": "x"}']
    try:
        r = httpx.post(f"{base}/infill", content=bodies[(i // 10 + i) % len(bodies)],
                       headers={"Content-Type": "application/json"}, timeout=60)
        out[f"malformed -> {r.status_code}"] += 1
    except httpx.HTTPError as exc:
        out[f"malformed error {type(exc).__name__}"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a checkpoint folder (default: the bundled model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=40, help="clients per round (mixed kinds)")
    args = parser.parse_args()

    port = free_port()
    code = ("import sys; from santacli.engine import Engine; from santacli.server import serve; "
            f"serve(Engine.load(sys.argv[1]), port={port}, max_queue=64, log_level='warning')")
    model = args.model or "tiny"
    proc = subprocess.Popen([sys.executable, "-c", code, model], env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
        reference = httpx.post(f"{base}/infill", json={"prefix": PREFIX, "suffix": SUFFIX, "max_tokens": 16},
                               timeout=120).json()["completion"]
        rows: list[dict[str, Any]] = [{"round": 0, "rss_mb": rss_mb(proc.pid), "seconds": 0.0, "outcomes": {}}]
        for rnd in range(1, args.rounds + 1):
            outcomes: Counter[str] = Counter()
            threads = []
            for i in range(args.clients):
                kind = i % 10
                if kind < 5:
                    target, extra = ordinary, (base, i, outcomes)
                elif kind < 7:
                    target, extra = disconnecting, (base, outcomes)
                elif kind == 7:
                    target, extra = slow, (port, outcomes)
                    threads.append(threading.Thread(target=slow, args=extra, kwargs={"body": i % 20 == 7}))
                    continue
                else:
                    target, extra = malformed, (base, i, outcomes)
                threads.append(threading.Thread(target=target, args=extra))
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rows.append({"round": rnd, "rss_mb": rss_mb(proc.pid), "seconds": time.perf_counter() - started,
                         "outcomes": dict(outcomes)})
        again = httpx.post(f"{base}/infill", json={"prefix": PREFIX, "suffix": SUFFIX, "max_tokens": 16},
                           timeout=120).json()["completion"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"\nsanta serve under load: {args.rounds} rounds x {args.clients} clients ({model}); "
          f"{os.cpu_count()} CPUs")
    print(f"{'round':>5} {'RSS MB':>8} {'seconds':>8}  outcomes")
    for row in rows:
        print(f"{row['round']:>5} {row['rss_mb']:>8.1f} {row['seconds']:>8.1f}  "
              + ", ".join(f"{k}: {v}" for k, v in sorted(row["outcomes"].items())))
    five_xx = sum(v for row in rows for k, v in row["outcomes"].items() if k.split()[-1].startswith("5")
                  and k.split()[-1] != "503")
    growth = rows[-1]["rss_mb"] - rows[1]["rss_mb"] if len(rows) > 2 else 0.0
    print(f"same answer after the load: {again == reference}; 5xx other than 503: {five_xx}; "
          f"RSS growth after round 1: {growth:+.1f} MB")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "server_load", "model": model, "rounds": rows,
                                   "same_answer_after": again == reference, "five_xx": five_xx,
                                   "rss_growth_after_round_1_mb": growth}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
