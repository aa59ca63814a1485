"""Does the layer path add anything on the demo zoo? Same budget and seeds: parameter space alone (the demo
spec: per-layer linear weights, CMA-ES), data-flow space alone (search_spaces/dataflow.yaml: a path over the
experts' blocks) and parameter space then data-flow space (search_spaces/ps_then_dfs.yaml's second stage: the
seed's PS winner added to the pool and giving the path its outer tensors, as Sakana's PS+DFS). Each search
ends as `evomerge search` does (top-k re-scored on validation, the winner scored on test). Prints one row per
search and mean +/- sd per space over seeds.

    python scripts/bench_dataflow.py [--budget 200] [--seeds 0 1 2] [--parallel] [--sampler cmaes|tpe]

``--parallel`` runs the seeds at once, one process each; wall times are then measured under that sharing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench_search import per_seed, print_seed_table, searched  # noqa: E402  (this folder: a script's own directory is on sys.path)

from evomerge.cli import _quiet_libraries  # noqa: E402
from evomerge.executors import InProcessExecutor, Worker  # noqa: E402
from evomerge.merge import merge_to_folder  # noqa: E402
from evomerge.spec import PathRecipe, SearchSpec, parse_recipe  # noqa: E402

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
LABELS = ("PS (demo, CMA-ES)", "DFS (dataflow.yaml)", "PS then DFS (ps_then_dfs.yaml)")


def one_search(spec: SearchSpec, budget: int) -> dict:
    """Search and finalize on a worker built for ``spec``; the winner's scores, recipe and the wall time."""
    start = time.perf_counter()
    executor = InProcessExecutor(Worker(spec))
    with searched(spec, executor, budget) as (search, _):
        summary = search.finalize()
    winner = summary["table"][f"winner (trial {summary['winner_trial']})"]
    recipe = parse_recipe(summary["winner_recipe"])
    shape = f"path of {len(recipe.path)}" if isinstance(recipe, PathRecipe) else "weights"
    return {"validation": winner["validation"], "test": winner["test"], "recipe": recipe, "shape": shape,
            "seconds": time.perf_counter() - start, "uniform_test": summary["table"]["uniform average"]["test"]}


def searches_of_seed(seed: int, budget: int, sampler: str) -> dict[str, dict]:
    _quiet_libraries()
    chain = SearchSpec.from_yaml(SPACES / "ps_then_dfs.yaml").model_copy(update={"seed": seed})  # stage 1: demo
    dfs_spec = SearchSpec.from_yaml(SPACES / "dataflow.yaml").model_copy(update={"seed": seed, "sampler": sampler})
    results = {LABELS[0]: one_search(chain, budget), LABELS[1]: one_search(dfs_spec, budget)}
    with tempfile.TemporaryDirectory() as tmp:
        winner = Path(tmp) / "ps-winner"
        merge_to_folder(results[LABELS[0]]["recipe"], winner)
        stage = chain.dataflow_stage(str(winner)).model_copy(update={"sampler": sampler})
        results[LABELS[2]] = one_search(stage, budget)
    for label, r in results.items():
        print(f"seed {seed} | {label} | validation {r['validation']:.4f} | test {r['test']:.4f} | {r['shape']} | "
              f"{r['seconds']:.0f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sampler", choices=("cmaes", "tpe"), default="cmaes", help="the data-flow searches'")
    parser.add_argument("--parallel", action="store_true", help="one process per seed, all at once")
    args = parser.parse_args()
    results = per_seed(searches_of_seed, [(seed, args.budget, args.sampler) for seed in args.seeds], args.parallel)
    print(f"\nbudget {args.budget}, seeds {args.seeds}, data-flow sampler {args.sampler}; "
          f"uniform average test {results[0][LABELS[0]]['uniform_test']:.4f}")
    print_seed_table(results, list(LABELS), "shape")


if __name__ == "__main__":
    main()
