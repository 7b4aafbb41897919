"""Cross-file context: does retrieval find what a missing line needs from other files?

Real multi-file code: a package's sdist from PyPI (``rich`` 13.9.4 by default, fetched with
``pip download`` into ``benchmarks/results/sdist/``). Single lines are cut out of its modules;
the cursor sits at the start of the missing line. A line's *target identifiers* are those it uses
that occur nowhere else in its own file: the model can only get them from other files. For each
budget (tokens of the context block, counted with SantaCoder's tokenizer when ``../shared/data``
has it, else santa-tiny's), **recall@budget** is the share of target identifiers that appear in
the context block, averaged over lines, for:

* ``none``: no context (0 by construction: the baseline every completion starts from);
* ``random``: snippets of random other files of the same language, filling the same budget;
* ``bm25``: what santa lays out (:mod:`santacli.context`: BM25 over identifiers, dedup, the budget);
* ``ceiling``: the share of target identifiers that occur in any other file at all.

Then a model (``--model``; the bundled santa-tiny, 512 positions, by default) on smaller samples,
greedy, ``mode=line``, with the same in-file window (the text nearest the cursor, 192 tokens) and
no context, random context or santa's context (256 tokens): exact match of the line, and the mean
log-probability per token the model gives the true line (which moves even where a weak model is
never exact). Lines of the package (code foreign to santa-tiny, which knows only CPython's
standard library), and lines of the standard-library files it never saw in training, with the
rest of ``Lib/`` as their repository.

``--index`` also times indexing: cold build, disk-cache save and load, and a query, for this
repository, CPython's ``Lib/`` (a plain folder) and the package.

    python benchmarks/context_recall.py                      # recall (400 lines) + EM (60 lines) + indexing
    python benchmarks/context_recall.py --samples 100 --em 0 # quick

Prints tables and writes ``benchmarks/results/context_recall.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

from santacli import context
from santacli.catalog import BUNDLED_DIR
from santacli.completion import CompletionOptions
from santacli.context import select
from santacli.fim import Encode, Snippet, fit_context, fit_to_budget
from santacli.repoindex import Index, identifiers
from santacli.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"
STDLIB = Path(os.path.dirname(os.__file__))


def fetch_package(spec: str) -> Path:
    """The package's source folder, from its sdist (downloaded once with pip)."""
    name, version = spec.split("==")
    folder = RESULTS / "sdist"
    unpacked = folder / f"{name}-{version}"
    if not unpacked.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        archive = folder / f"{name}-{version}.tar.gz"
        if not archive.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name, spec,
                            "-d", str(folder)], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
    for source in (unpacked / name, unpacked / "src" / name, unpacked / "src"):
        if source.is_dir():
            return source
    raise SystemExit(f"{unpacked} has no {name}/ or src/ package folder")


@dataclass
class Sample:
    path: str  # relative to the package
    prefix: str
    line: str
    suffix: str
    targets: frozenset[str]  # identifiers of the line found nowhere else in its file


def samples(root: Path, count: int, seed: int, only: set[str] | None = None) -> list[Sample]:
    """``count`` random lines that need something from another file (at least one target);
    ``only``: the files to take them from (paths relative to ``root``)."""
    out = []
    paths = sorted(root / rel for rel in only) if only is not None else sorted(root.rglob("*.py"))
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines = text.split("\n")
        for i, line in enumerate(lines):
            stripped = line.strip()
            if len(stripped) < 8 or stripped.startswith("#"):
                continue
            rest = "\n".join(lines[:i] + lines[i + 1:])
            targets = frozenset(identifiers(line)) - frozenset(identifiers(rest))
            if targets:
                prefix = "\n".join(lines[:i]) + "\n"
                out.append(Sample(rel, prefix, line, "\n" + "\n".join(lines[i + 1:]), targets))
    random.Random(seed).shuffle(out)
    return out[:count]


def random_snippets(index: Index, exclude: str, rng: random.Random, comment: tuple[str, str]) -> list[Snippet]:
    """Windows of random other Python files, in a random order (the baseline's offer)."""
    files = [rel for rel, f in index.files.items() if f.spans and rel != exclude and rel.endswith(".py")]
    picked = []
    for rel in rng.sample(files, min(len(files), 24)):
        number = rng.randrange(len(index.files[rel].spans))
        chunk = index.chunk(rel, number)
        if chunk is not None:
            picked.append(Snippet(chunk.path, chunk.start_line, chunk.end_line, chunk.text, comment, len(picked)))
    return picked


def block_identifiers(encode: Encode, snippets: list[Snippet] | tuple[Snippet, ...], budget: int) -> set[str]:
    """The identifiers of the context block that a prompt with this budget would hold."""
    _, used = fit_context(encode, snippets, budget)
    by_key = {(s.path, s.start_line): s for s in snippets}
    return {w for u in used for w in identifiers(by_key[(u.path, u.start_line)].text)}


def recall(args: argparse.Namespace, root: Path, encode: Encode) -> dict[str, object]:
    index = Index(root.resolve(), git=False)
    started = time.perf_counter()
    index.refresh()
    build = time.perf_counter() - started
    rows = samples(root, args.samples, args.seed)
    everywhere: dict[str, set[str]] = {}
    for rel in index.files:
        everywhere[rel] = set(identifiers((root / rel).read_text(encoding="utf-8")))
    scores: dict[str, dict[int, list[float]]] = {m: {b: [] for b in args.budgets} for m in ("random", "bm25")}
    ceiling, select_ms = [], []
    rng = random.Random(args.seed)
    for sample in rows:
        others = set().union(*(ids for rel, ids in everywhere.items() if rel != sample.path))
        ceiling.append(len(sample.targets & others) / len(sample.targets))
        t = time.perf_counter()
        chosen = select(sample.prefix, sample.suffix, target=sample.path, indexes=[index],
                        target_file=root / sample.path)
        select_ms.append((time.perf_counter() - t) * 1000)
        randoms = random_snippets(index, sample.path, rng, ("#", ""))
        for budget in args.budgets:
            for method, offered in (("bm25", chosen), ("random", randoms)):
                found = block_identifiers(encode, offered, budget)
                scores[method][budget].append(len(sample.targets & found) / len(sample.targets))
    return {
        "package": args.package, "files": index.stats.files, "chunks": index.stats.chunks, "lines": len(rows),
        "index_seconds": round(build, 3), "select_ms_median": round(statistics.median(select_ms), 1),
        "ceiling": statistics.mean(ceiling),
        "recall": {m: {str(b): statistics.mean(v) for b, v in per.items()} for m, per in scores.items()},
    }


def heldout_samples(count: int, seed: int) -> list[Sample]:
    """Lines of the standard-library files santa-tiny never saw in training (paths relative to
    the standard library), with at least one target identifier."""
    return samples(STDLIB, count, seed, only=set(json.loads((BUNDLED_DIR / "heldout_files.json").read_text())))


def exact_match(args: argparse.Namespace, name: str, root: Path, rows: list[Sample]) -> dict[str, object]:
    """santa-tiny's exact match on ``rows`` with no context, random context and santa's."""
    import torch

    from santacli.engine import Engine

    engine = Engine.load(args.model, device="cpu")
    tok = engine.tokenizer
    index = Index(root.resolve(), git=False)
    index.refresh()
    rng = random.Random(args.seed + 1)
    hits = {"none": 0, "random": 0, "bm25": 0}
    loglik: dict[str, list[float]] = {"none": [], "random": [], "bm25": []}
    used_tokens: dict[str, list[int]] = {"random": [], "bm25": []}
    for sample in rows:
        # The same in-file window for every arm: the text nearest the cursor, as an editor sends it.
        prefix, suffix, _ = fit_to_budget(tok.encode, sample.prefix, sample.suffix, args.window)
        arms = {"none": (), "random": tuple(random_snippets(index, sample.path, rng, ("#", ""))),
                "bm25": select(prefix, suffix, target=sample.path, indexes=[index], target_file=root / sample.path)}
        line_ids = tok.encode(sample.line)[: args.max_tokens]
        for arm, snippets in arms.items():
            engine.prompt_cache.clear()
            options = CompletionOptions(mode="line", max_tokens=args.max_tokens, context=snippets,
                                        context_tokens=args.em_context)
            result = engine.infill(prefix, suffix, options).result
            hits[arm] += result.text.strip() == sample.line.strip()
            # How likely the model finds the true line after this prompt (mean log-probability
            # per token): it moves even where a weak model's greedy line is never exact.
            ids = engine.build_prompt(prefix, suffix, options).ids
            logprobs = torch.log_softmax(engine.logits(ids + line_ids), dim=-1)
            picked = logprobs[len(ids) - 1:len(ids) - 1 + len(line_ids)].gather(1, torch.tensor(line_ids)[:, None])
            loglik[arm].append(float(picked.mean()))
            if arm in used_tokens:
                used_tokens[arm].append(sum(u.tokens for u in result.context))
    return {"source": name, "model": args.model, "lines": len(rows), "window_tokens": args.window,
            "context_tokens": args.em_context, "max_tokens": args.max_tokens,
            "exact_match": {arm: n / max(len(rows), 1) for arm, n in hits.items()},
            "line_logprob_per_token": {arm: statistics.mean(v) for arm, v in loglik.items()},
            "mean_context_tokens": {arm: round(statistics.mean(v), 1) if v else 0 for arm, v in used_tokens.items()}}


def indexing(targets: list[tuple[str, Path, bool]]) -> list[dict[str, object]]:
    """Cold build, save, load + refresh from the disk cache, one query, and the memory the
    loaded index holds (Python allocations, measured in a second load), per folder."""
    out = []
    for name, root, git in targets:
        index = Index(root.resolve(), git=git)
        t = time.perf_counter()
        stats = index.refresh()
        build = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "index.json"
            t = time.perf_counter()
            index.save(cache)
            save = time.perf_counter() - t
            size = cache.stat().st_size
            del index
            warm = Index(root.resolve(), git=git)
            t = time.perf_counter()
            warm.load(cache)
            warm.refresh()
            load = time.perf_counter() - t
            tracemalloc.start()
            measured = Index(root.resolve(), git=git)
            measured.load(cache)
            held = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            del measured
        probe = next(p for p in sorted(root.rglob("*.py")) if p.stat().st_size > 4000 and "test" not in p.name)
        text = probe.read_text(encoding="utf-8")
        t = time.perf_counter()
        select(text[: len(text) // 2], text[len(text) // 2:], target=probe.name, indexes=[warm], target_file=probe)
        query = time.perf_counter() - t
        out.append({"name": name, "files": stats.files, "skipped": stats.skipped, "chunks": stats.chunks,
                    "megabytes": round(stats.bytes / 2**20, 1), "build_s": round(build, 2), "save_s": round(save, 2),
                    "cache_megabytes": round(size / 2**20, 1), "load_and_refresh_s": round(load, 2),
                    "query_ms": round(query * 1000, 1), "index_memory_mb": round(held / 2**20)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", default="rich==13.9.4", help="NAME==VERSION of a pure-Python sdist on PyPI")
    ap.add_argument("--samples", type=int, default=400, help="lines for recall@budget")
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 1024])
    ap.add_argument("--em", type=int, default=60, help="lines for exact match with --model (0: skip)")
    ap.add_argument("--model", default=str(BUNDLED_DIR), help="model for exact match (default: santa-tiny)")
    ap.add_argument("--window", type=int, default=192, help="in-file tokens around the cursor for exact match")
    ap.add_argument("--em-context", type=int, default=256, help="context tokens for exact match")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--index", action=argparse.BooleanOptionalAction, default=True, help="time indexing too")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "context_recall.json")
    args = ap.parse_args()

    root = fetch_package(args.package)
    santacoder = SHARED / "santacoder_tokenizer.json"
    tokenizer = Tokenizer.from_file(santacoder if santacoder.is_file() else BUNDLED_DIR / "tokenizer.json")
    report: dict[str, object] = {
        "command": shlex.join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "tokenizer": "santacoder" if santacoder.is_file() else "santa-tiny",
        "window_lines": context.WINDOW, "stride_lines": context.STRIDE,
    }
    started = time.perf_counter()
    rec = recall(args, root, tokenizer.encode)
    report["recall"] = rec
    print(f"{args.package}: {rec['files']} files, {rec['chunks']} chunks, indexed in {rec['index_seconds']} s; "
          f"{rec['lines']} lines cut out (median select {rec['select_ms_median']} ms)")
    print(f"recall@budget of identifiers the line needs from other files ({report['tokenizer']} tokens):")
    print(f"  {'budget':>8} {'none':>7} {'random':>7} {'bm25':>7} {'ceiling':>8}")
    per = rec["recall"]
    assert isinstance(per, dict)
    for budget in args.budgets:
        print(f"  {budget:>8} {0:>7.1%} {per['random'][str(budget)]:>7.1%} {per['bm25'][str(budget)]:>7.1%} "
              f"{rec['ceiling']:>8.1%}")
    if args.em:
        report["exact_match"] = ems = [
            exact_match(args, args.package, root, samples(root, args.em, args.seed + 1)),
            exact_match(args, "stdlib held-out files (repository: CPython Lib/)", STDLIB,
                        heldout_samples(args.em, args.seed + 1)),
        ]
        print(f"model {Path(args.model).name}, greedy, mode=line, in-file window {args.window} tokens, "
              f"context {args.em_context} tokens: exact match / mean log-probability per token of the true line")
        for em in ems:
            match, ll = em["exact_match"], em["line_logprob_per_token"]
            assert isinstance(match, dict) and isinstance(ll, dict)
            print(f"  {em['source']:50} n={em['lines']:<3}" + "".join(
                f"  {arm} {match[arm]:>5.1%} / {ll[arm]:6.3f}" for arm in ("none", "random", "bm25"))
                + f"   (context tokens used: {em['mean_context_tokens']})")
    if args.index:
        report["indexing"] = rows = indexing([("santacli (git)", ROOT, True), ("CPython Lib/ (folder)", STDLIB, False),
                                              (args.package, root, False)])
        print("indexing (cold build; disk cache save; load + refresh; one query):")
        print(f"  {'':24} {'files':>6} {'MB':>5} {'chunks':>7} {'build s':>8} {'save s':>7} {'cache MB':>9} "
              f"{'load s':>7} {'query ms':>9} {'mem MB':>7}")
        for r in rows:
            print(f"  {r['name']:24} {r['files']:>6} {r['megabytes']:>5} {r['chunks']:>7} {r['build_s']:>8} "
                  f"{r['save_s']:>7} {r['cache_megabytes']:>9} {r['load_and_refresh_s']:>7} {r['query_ms']:>9} "
                  f"{r['index_memory_mb']:>7}")
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
