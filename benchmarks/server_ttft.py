"""santa serve: cold vs warm time to first token, and throughput under a small concurrent load.

Starts ``santa serve`` (``santacli.server.serve``) in a subprocess on a free loopback port with a
random-weight, SantaCoder-shaped checkpoint (or ``--model PATH``), then:

1. cold: a ~1,500-token Python file as an infill request, the cursor near its end (PSM) or in
   its middle (SPM), on an empty prompt cache;
2. warm: the same file with a one-line edit just above the cursor, which the server's prompt
   cache turns into a short tail to recompute;
3. load: C clients x R requests, each its own small edit of the file.

Time to first token is measured at the client as the latency of a ``max_tokens=1`` request (it
includes HTTP and JSON), and also read from the server's own ``time_to_first_token``. Prints a
table and writes ``benchmarks/results/server_ttft.json``.

    .venv/bin/python benchmarks/server_ttft.py [--model PATH] [--reps 3] [--clients 4 --requests 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "santacoder_tokenizer.json"
RESULTS = ROOT / "benchmarks" / "results" / "server_ttft.json"
MID_SIZE = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 2048, "vocab_size": 49280}


def build_checkpoint(folder: Path) -> Path:
    """A random SantaCoder-shaped MQA checkpoint (the real tokenizer when ../shared has it)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tokenizers import Tokenizer

    from checkpoints import build_tokenizer, write_checkpoint

    shared = SHARED_TOKENIZER.is_file()
    tokenizer = Tokenizer.from_file(str(SHARED_TOKENIZER)) if shared else build_tokenizer()
    return write_checkpoint(folder, tokenizer=tokenizer, seed=0, **MID_SIZE)


def python_file(tokens: int, count: Any) -> list[str]:
    """Lines of real Python source (the stdlib's textwrap and friends) worth ~``tokens`` tokens."""
    import json.encoder as json_encoder
    import shlex

    lines: list[str] = []
    for module in (textwrap, shlex, json_encoder):
        for line in Path(module.__file__ or "").read_text().splitlines(keepends=True):
            lines.append(line)
            if count("".join(lines)) >= tokens:
                return lines
    return lines


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(model: str, port: int, max_queue: int) -> subprocess.Popen[bytes]:
    code = (
        "import sys; from santacli.engine import Engine; from santacli.server import serve; "
        f"serve(Engine.load(sys.argv[1]), port={port}, max_queue={max_queue}, max_tokens_limit=256, "
        "log_level='warning')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, model], cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def infill(client: httpx.Client, prefix: str, suffix: str, *, fim_mode: str, max_tokens: int
           ) -> dict[str, Any]:
    started = time.perf_counter()
    response = client.post("/infill", json={"prefix": prefix, "suffix": suffix, "fim_mode": fim_mode,
                                            "max_tokens": max_tokens, "mode": "full"})
    response.raise_for_status()
    out: dict[str, Any] = response.json()
    out["client_s"] = time.perf_counter() - started
    return out


def tgi_first_token(client: httpx.Client, text: str) -> float:
    started = time.perf_counter()
    response = client.post("/generate", json={"inputs": text, "parameters": {"max_new_tokens": 1}})
    response.raise_for_status()
    return time.perf_counter() - started


def split(lines: list[str], at: float, variant: str, edit: str) -> tuple[str, str]:
    """Prefix and suffix around a cursor at fraction ``at`` of the file; ``edit`` changes the line
    just above the cursor; ``variant`` makes a file whose start differs from every other run."""
    cursor = int(len(lines) * at)
    body = list(lines)
    if edit:
        body[cursor - 1] = body[cursor - 1].rstrip("\n") + f"  # {edit}\n"
    return f"# {variant}\n" + "".join(body[:cursor]) + "    ", "\n" + "".join(body[cursor:])


def cold_warm(client: httpx.Client, lines: list[str], *, fim_mode: str, at: float, reps: int,
              spell: Any) -> dict[str, Any]:
    rows: dict[str, list[float]] = {k: [] for k in ("cold_s", "warm_s", "cold_server_s", "warm_server_s",
                                                     "tgi_cold_s", "tgi_warm_s")}
    prompt_tokens, reused = 0, 0
    for rep in range(reps):
        variant = f"{fim_mode} run {rep}"
        cold = infill(client, *split(lines, at, variant, ""), fim_mode=fim_mode, max_tokens=1)
        warm = infill(client, *split(lines, at, variant, "edited"), fim_mode=fim_mode, max_tokens=1)
        rows["cold_s"].append(cold["client_s"])
        rows["warm_s"].append(warm["client_s"])
        rows["cold_server_s"].append(cold["timings"]["time_to_first_token_s"])
        rows["warm_server_s"].append(warm["timings"]["time_to_first_token_s"])
        prompt_tokens, reused = warm["tokens"]["prompt"], warm["tokens"]["prompt_reused"]
        # The same through TGI's /generate with the FIM prompt spelled out by the client.
        tgi_variant = f"tgi {variant}"
        for key, edit in (("tgi_cold_s", ""), ("tgi_warm_s", "edited")):
            rows[key].append(tgi_first_token(client, spell(*split(lines, at, tgi_variant, edit), fim_mode)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {**med, "warm_over_cold": med["warm_s"] / med["cold_s"],
            "tgi_warm_over_cold": med["tgi_warm_s"] / med["tgi_cold_s"],
            "prompt_tokens": prompt_tokens, "warm_reused_tokens": reused, "cursor_at": at, "reps": reps}


def load_test(base: str, lines: list[str], *, clients: int, requests: int) -> dict[str, Any]:
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        with httpx.Client(base_url=base, timeout=600) as client:
            for r in range(requests):
                prefix, suffix = split(lines, 0.9, "load", f"client {index} edit {r}")
                try:
                    out = infill(client, prefix, suffix, fim_mode="psm", max_tokens=16)
                    with lock:
                        latencies.append(out["client_s"])
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(str(exc))

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {"clients": clients, "requests_per_client": requests, "max_tokens": 16, "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "failures": len(failures),
            "latency_p50_s": statistics.median(latencies) if latencies else None,
            "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
            if latencies else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a checkpoint folder (default: a random SantaCoder-shaped one)")
    parser.add_argument("--tokens", type=int, default=1500, help="size of the Python file in tokens")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()

    from santacli.tokenizer import FIM_FAMILIES, Tokenizer

    load_before = os.getloadavg()  # other work on the machine skews every number here

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_checkpoint(Path(tmp) / "model"))
        tok = Tokenizer.from_file(Path(model) / "tokenizer.json")
        assert tok.fim is not None
        names = FIM_FAMILIES[tok.fim.family]

        def spell(prefix: str, suffix: str, fim_mode: str) -> str:
            if fim_mode == "psm":
                return f"{names[0]}{prefix}{names[2]}{suffix}{names[1]}"
            return f"{names[0]}{names[2]}{suffix}{names[1]}{prefix}"

        lines = python_file(args.tokens, lambda text: len(tok.encode(text)))
        port = free_port()
        proc = start_server(model, port, max_queue=max(16, args.clients))
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base, timeout=600) as client:
                infill(client, "def warmup():\n    ", "\n", fim_mode="psm", max_tokens=2)  # first-call setup
                psm = cold_warm(client, lines, fim_mode="psm", at=0.9, reps=args.reps, spell=spell)
                spm = cold_warm(client, lines, fim_mode="spm", at=0.5, reps=args.reps, spell=spell)
            load = load_test(base, lines, clients=args.clients, requests=args.requests)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    import torch

    shape = "from --model" if args.model else ", ".join(f"{k} {v}" for k, v in MID_SIZE.items())
    print(f"\nsanta serve, {shape}; file {psm['prompt_tokens']} prompt tokens; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'layout (cursor)':<22}{'cold TTFT':>11}{'warm TTFT':>11}{'warm/cold':>11}"
          f"{'reused':>9}{'TGI cold':>10}{'TGI warm':>10}{'ratio':>8}")
    for name, row in (("PSM (90% down)", psm), ("SPM (50% down)", spm)):
        print(f"{name:<22}{row['cold_s']:>10.3f}s{row['warm_s']:>10.3f}s{row['warm_over_cold']:>11.3f}"
              f"{row['warm_reused_tokens']:>9}{row['tgi_cold_s']:>9.3f}s{row['tgi_warm_s']:>9.3f}s"
              f"{row['tgi_warm_over_cold']:>8.3f}")
    print(f"server-side TTFT (PSM): cold {psm['cold_server_s']:.3f}s, warm {psm['warm_server_s']:.3f}s")
    print(f"machine load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
          f"(on {os.cpu_count()} CPUs)")
    print(f"load: {load['clients']} clients x {load['requests_per_client']} requests (max_tokens 16): "
          f"{load['requests_per_s']:.2f} req/s, p50 {load['latency_p50_s']:.3f}s, "
          f"p95 {load['latency_p95_s']:.3f}s, {load['failures']} failures")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "server_ttft", "model": args.model or {"random": MID_SIZE},
        "target_warm_over_cold": 0.15,
        "psm": psm, "spm": spm, "load": load,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
    }, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
