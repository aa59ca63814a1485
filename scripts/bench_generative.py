"""Per-candidate cost of a generative task against the loglikelihood form of the same skill, on the live
path (merge in place, then lm-eval on tasks built once): demo_add (one teacher-forced pass per document)
and demo_add_gen (greedy generation until ".", regex answer filter, exact match) on the same documents of
the test split, at 50, 200 and all 500 per task. Both forms score a document right exactly when greedy
decoding reproduces its answer, so their scores agree; the table shows what generation costs.

    python scripts/bench_generative.py [--candidates 6] [--seeds 0 1 2] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from bench_eval import MODELS, ForwardTimer, random_recipe  # this folder is on sys.path; sets HF offline

from evomerge.cli import _quiet_libraries
from evomerge.executors import Job
from evomerge.spec import SearchSpec
from evomerge.worker import Worker

FORMS = {"loglikelihood (demo_add)": {"name": "demo_add"},
         "generate_until (demo_add_gen)": {"name": "demo_add_gen", "metric": "exact_match"}}


def per_candidate(task: dict, n_docs: int, candidates: int, seed: int, batch_size: int) -> tuple[float, float, float]:
    """Mean wall seconds and forward seconds per candidate, and the mean score."""
    spec = SearchSpec.model_validate({"base_model": "demo:base", "models": MODELS, "evaluation": {
        "include_paths": ["demo"], "tasks": [task], "batch_size": batch_size}})
    worker = Worker(spec)
    timer = ForwardTimer(worker.model)
    ids = {task["name"]: worker.doc_ids(task["name"], "test")[:n_docs]}
    rng = random.Random(seed)
    worker.run(Job(random_recipe(rng), "test", ids))  # warm-up
    timer.seconds, scores, start = 0.0, [], time.perf_counter()
    for _ in range(candidates):
        outcome = worker.run(Job(random_recipe(rng), "test", ids))
        if outcome.error or outcome.result is None:
            raise RuntimeError(outcome.error)
        scores.append(outcome.result.score)
    return (time.perf_counter() - start) / candidates, timer.seconds / candidates, statistics.mean(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    _quiet_libraries()
    print("| docs | form | s per candidate (mean ± sd over seeds) | forward share | mean score | ratio |")
    print("|---|---|---|---|---|---|")
    for n_docs in (50, 200, 500):
        base = None
        for label, task in FORMS.items():
            runs = [per_candidate(task, n_docs, args.candidates, seed, args.batch_size) for seed in args.seeds]
            wall = [r[0] for r in runs]
            mean = statistics.mean(wall)
            base = base or mean
            sd = statistics.stdev(wall) if len(wall) > 1 else 0.0
            share = statistics.mean(r[1] / r[0] for r in runs)
            print(f"| {n_docs} | {label} | {mean:.3f} ± {sd:.3f} | {share:.0%} | "
                  f"{statistics.mean(r[2] for r in runs):.4f} | {mean / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
