"""Does choosing the merge method per layer group help? On the demo zoo, same budget and seeds, the
layer-wise method search (search_spaces/layerwise_methods.yaml) against the best single-method search
(method_choice.yaml: the same coefficient layout, one method for the whole model) and against per-layer
linear weights with CMA-ES (the demo spec). Each search ends as `evomerge search` does (top-k re-scored on
validation, the winner scored on test). Prints one row per search and mean +/- sd per spec over seeds.

    python scripts/bench_layerwise.py [--budget 200] [--seeds 0 1 2] [--parallel]

``--parallel`` runs the seeds at once, one process (and one worker) each: for a machine with many cores or
a GPU; wall times are then measured under that sharing.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench_search import per_seed, print_seed_table, searched  # noqa: E402  (this folder: a script's own directory is on sys.path)

from evomerge.cli import _quiet_libraries  # noqa: E402
from evomerge.executors import InProcessExecutor
from evomerge.recipes import parse_recipe  # noqa: E402
from evomerge.spec import SearchSpec  # noqa: E402
from evomerge.worker import Worker

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
SPECS = {"per-layer linear (demo, CMA-ES)": "demo.yaml", "one method (method_choice, TPE)": "method_choice.yaml",
         "method per layer group (layerwise_methods, TPE)": "layerwise_methods.yaml"}


def one_search(spec: SearchSpec, executor: InProcessExecutor, budget: int) -> dict:
    """Search, finalize; the winner's validation and test scores, its methods per block and the wall time."""
    with searched(spec, executor, budget) as (search, search_seconds):
        start = time.perf_counter()
        summary = search.finalize()
        seconds = search_seconds + time.perf_counter() - start
    winner = summary["table"][f"winner (trial {summary['winner_trial']})"]
    recipe = parse_recipe(summary["winner_recipe"])
    methods = "/".join(part.merge_method for part in recipe.parts)
    return {"validation": winner["validation"], "test": winner["test"], "methods": methods, "seconds": seconds,
            "uniform_test": summary["table"]["uniform average"]["test"]}


def searches_of_seed(seed: int, budget: int) -> dict[str, dict]:
    """Every spec's search with this seed, on one worker (same models and tasks in all three)."""
    _quiet_libraries()
    specs = {label: SearchSpec.from_yaml(SPACES / name) for label, name in SPECS.items()}
    executor = InProcessExecutor(Worker(next(iter(specs.values()))))
    results = {}
    for label, spec in specs.items():
        result = one_search(spec.model_copy(update={"seed": seed}), executor, budget)
        results[label] = result
        print(f"seed {seed} | {label} | validation {result['validation']:.4f} | test {result['test']:.4f} | "
              f"{result['methods']} | {result['seconds']:.0f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", action="store_true", help="one process per seed, all at once")
    args = parser.parse_args()
    results = per_seed(searches_of_seed, [(seed, args.budget) for seed in args.seeds], args.parallel)
    print(f"\nbudget {args.budget}, seeds {args.seeds}; "
          f"uniform average test {results[0][next(iter(SPECS))]['uniform_test']:.4f}")
    print_seed_table(results, list(SPECS), "methods")


if __name__ == "__main__":
    main()
