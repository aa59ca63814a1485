"""Trials per minute of the demo search on this machine: the in-process executor, Ray with 1 worker (all
threads) and Ray with 2 workers (threads split), side by side in one run, with each worker's idle fraction
(search-loop wall time not spent merging or evaluating). Start-up (model loading, Ray's start) is timed
apart from the loop.

    ../shared/offline python scripts/bench_scaling.py --budget 60 --repeats 2

Ray starts a local cluster: run it inside a loopback-only network namespace on machines like this one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.demo import DEMO_SPEC  # noqa: E402
from evomerge.launch import make_executor, run_search  # noqa: E402
from evomerge.run import RunFolder  # noqa: E402
from evomerge.spec import SearchSpec  # noqa: E402

CONFIGS = {  # label -> (executor kind, workers)
    "in-process": ("local", None),
    "ray, 1 worker x 2 threads": ("ray", 1),
    "ray, 2 workers x 1 thread": ("ray", 2),
}


def measure(spec: SearchSpec, kind: str, workers: int | None, budget: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run = RunFolder(Path(tmp) / "run")
        start = time.perf_counter()
        executor = make_executor(spec, kind, workers)
        try:
            ready = time.perf_counter()
            run_search(spec, run, budget, executor, finalize=False)
            loop = time.perf_counter() - ready
        finally:
            executor.close()
        busy: dict[str, float] = defaultdict(float)
        for row in run.log_rows():
            busy[row["worker"]] += row.get("merge_s", 0.0) + row.get("eval_s", 0.0)
    idle = [1 - b / loop for b in busy.values()]
    return {"startup_s": ready - start, "loop_s": loop, "trials_per_min": budget / loop * 60,
            "idle_mean": statistics.mean(idle), "idle_max": max(idle), "workers_used": len(busy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration, interleaved")
    parser.add_argument("--spec", default=str(DEMO_SPEC))
    args = parser.parse_args()
    spec = SearchSpec.from_yaml(args.spec)
    results: dict[str, list[dict[str, float]]] = defaultdict(list)
    for repeat in range(args.repeats):
        for label, (kind, workers) in CONFIGS.items():
            print(f"run {repeat + 1}/{args.repeats}: {label} ...", file=sys.stderr, flush=True)
            results[label].append(measure(spec, kind, workers, args.budget))
    base = statistics.mean(r["trials_per_min"] for r in results["in-process"])
    print(f"\nDemo search, budget {args.budget}, {args.repeats} run(s) each (mean; range over runs), "
          f"{os.cpu_count()} CPUs\n")
    print("| executor | trials/min | vs in-process | loop s | start-up s | idle fraction per worker (mean, max) |")
    print("|---|---|---|---|---|---|")
    for label, rows in results.items():
        tpm = [r["trials_per_min"] for r in rows]
        idle = statistics.mean(r["idle_mean"] for r in rows)
        idle_max = max(r["idle_max"] for r in rows)
        print(f"| {label} | {statistics.mean(tpm):.1f} ({min(tpm):.1f}-{max(tpm):.1f}) | "
              f"{statistics.mean(tpm) / base:.2f}x | {statistics.mean(r['loop_s'] for r in rows):.1f} | "
              f"{statistics.mean(r['startup_s'] for r in rows):.1f} | {idle:.1%}, {idle_max:.1%} |")


if __name__ == "__main__":
    main()
