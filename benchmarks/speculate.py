"""Speculative decoding from the prompt: what a k-token step costs, and what it buys end to end.

One run, three parts, each against its peer in the same run (plain decoding):

1. **Step cost.** A random-weight model of SantaCoder's shape (24 layers, n_embd 2048, 16 heads
   MQA, vocab 49,280, 2,048 positions; N(0, 0.02) weights) is built in memory for each weight
   type (int8, bf16, fp32), its KV cache filled to ``--context`` positions; then the time of a
   decode step of k tokens (the last token plus k-1 drafted ones, the causal k-token step that
   verifies a draft) against a one-token step, with the native C step and with PyTorch's.
   Repeats are interleaved over k; ratios of the best times (the machine may be shared).
2. **End to end.** The bundled santa-tiny model (int8, native step) completes real FIM tasks
   through the whole pipeline (``Engine.infill``, mode auto) with ``speculate="off"`` and
   ``"8"`` (auto's draft length; auto itself leaves a model this small alone: its weights sit
   in the CPU caches, so k tokens cost nearly k steps and the speed-up is ~1x), interleaved,
   best of ``--e2e-reps`` runs, prompt cache cleared before each: HumanEval
   single-line infilling (``../shared/data``), held-out standard-library files (its
   ``heldout_files.json``; 1-4 lines cut out at a random line of each), and prompts of random
   tokens (nothing there to copy; what the drafter finds is the model repeating itself).
   Decode tokens/s = (tokens - 1) / (time after the first token), summed over the tasks; the
   texts must be identical. Drafted/accepted tokens and the drafter's own cost per step are
   reported. ``adversarial-replay`` runs the drafter alone against outputs built to miss
   every draft while the prompt offers a match at every step: the worst case.
3. **Projection.** The steps the speculative runs took (how many tokens each one fed) priced
   with part 1's step costs: plain decoding needs (tokens - 1) one-token steps, speculative
   decoding the recorded steps, each costing c(k) one-token steps. That ratio is the decode
   speed-up to expect at SantaCoder's shape, assuming a real SantaCoder copies from its prompt
   as often as santa-tiny does (the output is verified exactly, so only acceptance matters).

llama.cpp's lookup decoding is compared only where ``llama_cpp`` imports; PyPI has no binary
wheel of llama-cpp-python for this platform (a source build takes ~10 min on 2 cores, see
benchmarks/README.md), so the run says it skipped it.

    .venv/bin/python benchmarks/speculate.py              # everything, a few minutes on 2 cores
    .venv/bin/python benchmarks/speculate.py --quick      # int8 step costs, fewer tasks
    .venv/bin/python benchmarks/speculate.py --kinds int8 --paths native --humaneval 300

Writes ``benchmarks/results/speculate.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import importlib.util
import json
import os
import platform
import random
import shlex
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speculate.json"
SHARED = ROOT.parent / "shared" / "data"
SANTACODER = {"vocab_size": 49280, "n_embd": 2048, "n_layer": 24, "n_head": 16, "n_positions": 2048}
KS = (1, 2, 3, 4, 5, 6, 7, 8, 9)  # tokens per step; 9 = the pending token + a full draft of 8
# santa-tiny is far too small for "auto" (its steps are not memory-bound: generate.py's
# AUTO_MIN_STEP_BYTES), so the end-to-end runs ask for auto's draft length explicitly.
SPECULATE = {"off": "off", "on": "8"}


# =============================================================================================
# 1. Step cost at SantaCoder's shape


def build_model(kind: str, seed: int) -> Any:
    """A random GPTBigCode of SantaCoder's shape with ``kind`` weights (int8 converts each linear
    layer as it is made, as loading does, so no full fp32 copy exists)."""
    import torch
    from torch import nn

    from santacli.config import ModelConfig
    from santacli.model import GPTBigCode
    from santacli.quantize import int8_embedding, int8_linear

    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    config = ModelConfig(**SANTACODER)
    with torch.device("meta"):
        model = GPTBigCode(config, backend="sdpa")
    gen = torch.Generator().manual_seed(seed)

    def fill(module: nn.Module) -> None:
        for name, param in list(module.named_parameters(recurse=False)):
            if name == "weight" and isinstance(module, nn.LayerNorm):
                value = torch.ones(param.shape, dtype=dtype)
            elif name == "bias":
                value = torch.zeros(param.shape, dtype=dtype)
            else:
                value = (torch.randn(param.shape, generator=gen) * 0.02).to(dtype)
            setattr(module, name, nn.Parameter(value, requires_grad=False))

    fill(model.wpe)
    fill(model.ln_f)
    fill(model.wte)
    if kind == "int8":
        head = nn.Linear(config.n_embd, config.vocab_size, bias=False, device="meta")
        head.weight = model.wte.weight
        model.lm_head = int8_linear(head)
        model.transformer["wte"] = int8_embedding(model.lm_head)
        del head
    else:
        model.tie_weights()
    for block in model.blocks:
        for module in block.modules():
            fill(module)
        if kind == "int8":
            attn, mlp = block.attn, block.mlp
            attn.c_attn, attn.c_proj = int8_linear(attn.c_attn), int8_linear(attn.c_proj)
            mlp.c_fc, mlp.c_proj = int8_linear(mlp.c_fc), int8_linear(mlp.c_proj)
    return model.eval()


def time_steps(model: Any, path: str, context: int, ks: list[int], reps: int, seed: int) -> dict[int, list[float]]:
    """Seconds of a k-token cached step at position ``context``, ``reps`` interleaved repeats."""
    import torch

    from santacli import native

    desc = native.attach(model, path)
    if path == "native" and not desc.startswith("native"):
        raise RuntimeError(desc)
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache(batch=1, max_len=context + max(ks) + 1)
    cache.k[:, :, :, :context] = torch.randn(cache.k[:, :, :, :context].shape, generator=gen).to(cache.k.dtype)
    cache.v[:, :, :, :context] = torch.randn(cache.v[:, :, :, :context].shape, generator=gen).to(cache.v.dtype)
    cache.length = context
    ids = torch.randint(0, 49152, (1, max(ks)), generator=gen)
    times: dict[int, list[float]] = {k: [] for k in ks}
    with torch.inference_mode():
        for k in ks:  # warm-up: first-touch of buffers, thread pools
            model(ids[:, :k], start_pos=context, cache=cache, step=True, last_only=k == 1)
        for _ in range(reps):
            for k in ks:
                started = time.perf_counter()
                model(ids[:, :k], start_pos=context, cache=cache, step=True, last_only=k == 1)
                times[k].append(time.perf_counter() - started)
    return times


def step_costs(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    import torch

    out: dict[str, dict[str, Any]] = {}
    for kind in args.kinds:
        started = time.perf_counter()
        model = build_model(kind, args.seed)
        print(f"  built {kind} SantaCoder-shape model in {time.perf_counter() - started:.0f} s", flush=True)
        for path in args.paths:
            ks = list(KS) if (kind, path) == ("int8", "native") else [1, 2, 4, 8, 9]
            try:
                times = time_steps(model, path, args.context, ks, args.reps, args.seed)
            except RuntimeError as exc:
                report["notes"].append(f"{kind} {path}: {exc}")
                continue
            med = {k: statistics.median(v) for k, v in times.items()}
            best = {k: min(v) for k, v in times.items()}
            # Ratios of the best of the interleaved repeats: the machine is shared, and other
            # work only ever adds time.
            out[f"{kind}-{path}"] = {"kind": kind, "path": path, "median_s": med, "best_s": best,
                                     "ratio": {k: best[k] / best[1] for k in ks}, "runs_s": times}
            print("  " + step_row(kind, path, best), flush=True)
        del model
        torch.set_num_threads(args.threads)
    return out


def step_row(kind: str, path: str, med: dict[int, float]) -> str:
    cells = [f"{kind:<5} {path:<8} k=1 {med[1] * 1e3:7.1f} ms"]
    cells += [f"k={k} {med[k] / med[1]:5.2f}x" for k in (2, 4, 8, 9) if k in med]
    return "  ".join(cells)


# =============================================================================================
# 2. End to end with santa-tiny


def humaneval_tasks(count: int, seed: int) -> list[tuple[str, str]]:
    path = SHARED / "HumanEval-SingleLineInfilling.jsonl.gz"
    if not path.is_file():
        return []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    random.Random(seed).shuffle(rows)
    return [(r["prompt"], r["suffix"]) for r in rows[:count]]


def stdlib_tasks(count: int, seed: int) -> list[tuple[str, str]]:
    """1-4 lines cut out of held-out standard-library files (santa-tiny never saw them)."""
    from santacli.catalog import BUNDLED_DIR

    files = json.loads((BUNDLED_DIR / "heldout_files.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    texts = []
    for rel in files:
        try:
            lines = (stdlib / rel).read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError):
            continue
        if len(lines) >= 20:
            texts.append(lines)
    tasks = []
    for i in range(count):
        lines = texts[i % len(texts)]
        at, cut = rng.randrange(5, len(lines) - 5), rng.randint(1, 4)
        tasks.append(("\n".join(lines[:at]) + "\n", "\n" + "\n".join(lines[at + cut:])))
    return tasks


def random_texts(engine: Any, count: int, seed: int, length: int = 300) -> list[str]:
    """Prompts of random ordinary tokens: nothing the model writes is likely to match them."""
    rng = random.Random(seed)
    vocab = engine.tokenizer.vocab_size
    specials = engine.tokenizer.sentinel_ids
    texts = []
    for _ in range(count):
        ids = [t for t in (rng.randrange(vocab) for _ in range(length)) if t not in specials]
        texts.append(engine.tokenizer.decode(ids))
    return texts


class StepLog:
    """Wraps ``model.forward`` to record how many tokens each decode step fed."""

    def __init__(self, model: Any) -> None:
        self.model, self.sizes, self.on = model, [], False
        forward = model.forward

        def recording(input_ids: Any, **kw: Any) -> Any:
            if self.on and (kw.get("step") or input_ids.shape[1] == 1):
                self.sizes.append(int(input_ids.shape[1]))
            return forward(input_ids, **kw)

        model.forward = recording


def end_to_end(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    import torch

    from santacli import Engine
    from santacli.completion import CompletionOptions

    torch.set_num_threads(args.e2e_threads)  # a model this small gains nothing from threads
    engine = Engine.load("tiny", quantize="int8", decode="native" if "native" in args.paths else "pytorch")
    print(f"  santa-tiny: {engine.info.decode}, int8, {args.e2e_threads} thread(s)", flush=True)
    log = StepLog(engine.model)
    sets: dict[str, list[tuple[str, Any]]] = {
        "humaneval-infill": [("infill", t) for t in humaneval_tasks(args.humaneval, args.seed)],
        "stdlib-fim": [("infill", t) for t in stdlib_tasks(args.files, args.seed)],
        "random-prompt": [("raw", t) for t in random_texts(engine, args.nomatch, args.seed)],
    }
    if not sets["humaneval-infill"]:
        report["notes"].append(f"HumanEval infilling skipped: {SHARED} not present")
    out: dict[str, Any] = {"decode": engine.info.decode}
    for name, tasks in sets.items():
        if not tasks:
            continue
        rows: dict[str, dict[str, float]] = {m: {"tokens": 0, "decode_s": 0.0, "drafted": 0, "accepted": 0}
                                             for m in ("off", "on")}
        steps: list[int] = []
        identical = 0
        for i, (how, task) in enumerate(tasks):
            results, best = {}, {"off": float("inf"), "on": float("inf")}
            # Interleaved repeats, the best time of each: on a shared machine a descheduled
            # thread adds whole milliseconds to a step here and there.
            for rep in range(args.e2e_reps):
                for mode in (("off", "on") if (i + rep) % 2 == 0 else ("on", "off")):
                    engine.prompt_cache.clear()
                    opts = CompletionOptions(max_tokens=args.max_tokens, speculate=SPECULATE[mode])
                    log.on, log.sizes = mode == "on", []
                    run = engine.infill(*task, opts) if how == "infill" else engine.generate_text(task, opts)
                    res = run.result
                    log.on = False
                    if mode == "on" and rep == 0:
                        steps += log.sizes
                    results[mode] = res
                    best[mode] = min(best[mode], res.elapsed - res.time_to_first_token)
            for mode, res in results.items():
                row = rows[mode]
                row["tokens"] += res.generated_tokens
                row["decode_s"] += best[mode]
                row["drafted"] += res.drafted_tokens
                row["accepted"] += res.accepted_tokens
            identical += (results["off"].text, results["off"].stop_reason) == (results["on"].text,
                                                                              results["on"].stop_reason)
        n = len(tasks)
        decode_tokens = rows["off"]["tokens"] - n  # the first token of each comes from the prefill
        speed = {m: decode_tokens / rows[m]["decode_s"] for m in rows}
        out[name] = {"tasks": n, "identical": identical, "tokens": rows["off"]["tokens"], "modes": rows,
                     "decode_tok_s": speed, "speedup": speed["on"] / speed["off"],
                     "drafted": rows["on"]["drafted"], "accepted": rows["on"]["accepted"],
                     "steps": steps, "decode_tokens": decode_tokens}
        print(f"  {name}: {n} tasks, {identical} identical, {speed['off']:.0f} -> {speed['on']:.0f} tok/s "
              f"({speed['on'] / speed['off']:.2f}x)", flush=True)
    sizes, decode_tokens = adversarial_steps(args.seed)
    out["adversarial-replay"] = {"tasks": 20, "steps": sizes, "decode_tokens": decode_tokens,
                                 "drafted": sum(sizes) - len(sizes), "accepted": 0}
    out["drafter_us_per_step"] = drafter_cost([t for how, t in sets["stdlib-fim"]], engine)
    return out


def drafter_cost(tasks: list[tuple[str, str]], engine: Any) -> float:
    """Microseconds of PromptLookup work (index the output, propose) per decode step."""
    from santacli.speculate import PromptLookup

    total, count = 0.0, 0
    for prefix, suffix in tasks[:20]:
        ids = engine.tokenizer.encode(prefix + suffix)[-450:]
        started = time.perf_counter()
        drafter = PromptLookup(ids[:-64], max_draft=8)
        for tok in ids[-64:]:
            drafter.propose()
            drafter.update(2, 1)
            drafter.extend([tok])
        total += time.perf_counter() - started
        count += 64
    return total / count * 1e6


def adversarial_steps(seed: int, tasks: int = 20, length: int = 64) -> tuple[list[int], int]:
    """The worst case, replayed without a model: prompts of 400 tokens over a 16-token alphabet
    (every bigram recurs, so the drafter always finds a match) and outputs that always differ
    from the draft's first token. Returns the step sizes speculation takes and the decode
    tokens (plain decoding's one-token steps)."""
    from santacli.speculate import PromptLookup

    rng = random.Random(seed)
    sizes: list[int] = []
    for _ in range(tasks):
        drafter = PromptLookup([rng.randrange(16) for _ in range(400)], max_draft=8)
        drafter.extend([rng.randrange(16)])
        for _ in range(length - 1):
            draft = drafter.propose()
            tok = rng.choice([t for t in range(16) if not draft or t != draft[0]])
            drafter.update(len(draft), 0)
            drafter.extend([tok])
            sizes.append(1 + len(draft))
    return sizes, tasks * (length - 1)


# =============================================================================================
# 3. Projection


def project(e2e: dict[str, Any], costs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Decode speed-up at SantaCoder's shape: (tokens - 1) one-token steps against the recorded
    steps, each priced at c(k) one-token steps of that weight type and path."""
    out: dict[str, dict[str, float]] = {}
    for key, cost in costs.items():
        ratio = {int(k): v for k, v in cost["ratio"].items()}
        # Step sizes not measured (only int8 native measures every k) cost as the next larger one.
        price = {k: ratio[min((x for x in ratio if x >= k), default=max(ratio))] for k in KS}
        for name, res in e2e.items():
            if isinstance(res, dict) and res.get("steps"):
                out.setdefault(name, {})[key] = res["decode_tokens"] / sum(price[k] for k in res["steps"])
    return out


# =============================================================================================


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="int8 step costs only, fewer tasks and repeats")
    parser.add_argument("--kinds", default="int8,bf16,fp32", help="weight types for the step costs")
    parser.add_argument("--paths", default="native,pytorch", help="decode paths for the step costs")
    parser.add_argument("--context", type=int, default=512, help="filled KV positions for the step costs")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repeats per step size")
    parser.add_argument("--humaneval", type=int, default=200, help="HumanEval infilling tasks")
    parser.add_argument("--files", type=int, default=66, help="held-out standard-library FIM tasks")
    parser.add_argument("--nomatch", type=int, default=20, help="random-token prompts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="threads for the step costs")
    parser.add_argument("--e2e-threads", type=int, default=1, help="threads for santa-tiny")
    parser.add_argument("--e2e-reps", type=int, default=2, help="interleaved runs per task and mode (best kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-steps", action="store_true", help="no step costs (and no projection)")
    parser.add_argument("--skip-e2e", action="store_true", help="no end-to-end runs (and no projection)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.kinds, args.reps, args.humaneval, args.files, args.nomatch = "int8", 3, 40, 22, 6
    args.kinds = args.kinds.split(",")
    args.paths = args.paths.split(",")

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    command = shlex.join([sys.executable, *sys.argv])
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"command: {command}\ntorch {torch.__version__}, python {platform.python_version()}, {cpu}, "
          f"{os.cpu_count()} CPUs, {args.threads} threads; {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    report: dict[str, Any] = {"command": command, "cpu": cpu, "threads": args.threads, "torch": torch.__version__,
                              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "started": dt.datetime.now(dt.timezone.utc).isoformat(), "notes": []}
    if importlib.util.find_spec("llama_cpp") is None:
        report["notes"].append("llama.cpp: llama_cpp is not installed (no binary wheel on PyPI for this platform; "
                               "a source build takes ~10 min on 2 cores): its lookup decoding was not compared")
    else:
        report["notes"].append("llama.cpp: llama_cpp is installed, but this script does not drive its lookup "
                               "decoding yet")

    costs: dict[str, Any] = {}
    if not args.skip_steps:
        print(f"\n1. step cost at SantaCoder's shape, context {args.context}, {args.reps} repeats", flush=True)
        costs = step_costs(args, report)
    report["step_costs"] = costs
    e2e: dict[str, Any] = {}
    if not args.skip_e2e:
        print(f"\n2. end to end, santa-tiny, max {args.max_tokens} tokens", flush=True)
        e2e = end_to_end(args, report)
    report["end_to_end"] = {k: ({kk: vv for kk, vv in v.items() if kk != "steps"} if isinstance(v, dict) else v)
                            for k, v in e2e.items()}
    projection = project(e2e, costs) if costs and e2e else {}
    report["projection"] = projection
    report["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nstep cost: a k-token step against a one-token step (SantaCoder shape, context {args.context})")
    header = f"{'weights':<8}{'step':<9}{'k=1 ms':>8}" + "".join(f"{'k=' + str(k):>8}" for k in (2, 4, 8, 9))
    print(header)
    for cost in costs.values():
        best = cost["best_s"]
        print(f"{cost['kind']:<8}{cost['path']:<9}{best[1] * 1e3:8.1f}"
              + "".join(f"{best[k] / best[1]:7.2f}x" for k in (2, 4, 8, 9)))
    if e2e:
        keys = list(costs)
        print(f"\nend to end: santa-tiny int8 ({e2e['decode']}), decode tokens/s without -> with speculation")
        print(f"{'tasks':<19}{'n':>4}{'same':>6}{'tokens':>8}{'off':>8}{'on':>8}{'speedup':>9}{'accept':>8}"
              f"{'tok/step':>9}" + "".join(f"{'proj ' + k:>20}" for k in keys))
        for name, res in e2e.items():
            if not isinstance(res, dict):
                continue
            steps = len(res["steps"])
            accept = res["accepted"] / res["drafted"] if res["drafted"] else 0.0
            if "decode_tok_s" in res:
                measured = (f"{res['identical']:>6}{res['tokens']:>8}{res['decode_tok_s']['off']:8.0f}"
                            f"{res['decode_tok_s']['on']:8.0f}{res['speedup']:8.2f}x")
            else:  # replayed, no model ran
                measured = f"{'-':>6}{res['decode_tokens']:>8}{'-':>8}{'-':>8}{'-':>9}"
            print(f"{name:<19}{res['tasks']:>4}{measured}{accept:8.0%}{res['decode_tokens'] / max(steps, 1):9.2f}"
                  + "".join(f"{projection.get(name, {}).get(k, float('nan')):19.2f}x" for k in keys))
        print(f"drafter: {e2e['drafter_us_per_step']:.1f} us per step")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
