"""Does the layer path add anything on the demo zoo? Same budget and seeds: parameter space alone (the demo
spec: per-layer linear weights, CMA-ES), data-flow space alone (search_spaces/dataflow.yaml: a path over the
experts' blocks) and parameter space then data-flow space (search_spaces/ps_then_dfs.yaml's second stage: the
seed's PS winner added to the pool and giving the path its outer tensors, as Sakana's PS+DFS). Each search
ends as `evomerge search` does (top-k re-scored on validation, the winner scored on test). Prints one row per
search (a path winner's steps as FOLDER.BLOCKxSCALE) and mean +/- sd per space over seeds.

    python scripts/bench_dataflow.py [--budget 200] [--seeds 0 1 2] [--parallel] [--sampler cmaes|tpe]
        [--spaces ps dfs chain] [--ps-spec PATH] [--dfs-spec PATH]

``--parallel`` runs the seeds at once, one process each; wall times are then measured under that sharing.
``--spaces`` picks which of the three searches run (``chain`` needs ``ps``); ``--ps-spec`` (a weight-space spec
with a ``then:`` stage when ``chain`` runs) and ``--dfs-spec`` replace the demo specs, e.g. with
``search_spaces/depth_zoo_ps.yaml`` and ``depth_zoo_dfs.yaml`` (models from ``scripts/build_depth_zoo.py``).
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
from evomerge.executors import InProcessExecutor
from evomerge.merge import merge_to_folder  # noqa: E402
from evomerge.recipes import parse_recipe  # noqa: E402
from evomerge.spec import SearchSpec  # noqa: E402
from evomerge.worker import Worker

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
SPACE_NAMES = ("ps", "dfs", "chain")


def one_search(spec: SearchSpec, budget: int) -> dict:
    """Search and finalize on a worker built for ``spec``; the winner's scores, recipe and the wall time."""
    start = time.perf_counter()
    executor = InProcessExecutor(Worker(spec))
    with searched(spec, executor, budget) as (search, _):
        summary = search.finalize()
    winner = summary["table"][f"winner (trial {summary['winner_trial']})"]
    recipe = parse_recipe(summary["winner_recipe"])
    shape, path = "weights", ""
    if recipe.engine == "path":
        shape = recipe.label
        path = " ".join(f"{Path(s.model).name}.{s.layer}" + (f"x{s.scale:.2f}" if s.scale != 1 else "")
                        for s in recipe.path)
    return {"validation": winner["validation"], "test": winner["test"], "recipe": recipe, "shape": shape, "path": path,
            "seconds": time.perf_counter() - start, "uniform_test": summary["table"]["uniform average"]["test"]}


def labels(ps_spec: Path, dfs_spec: Path, spaces: list[str]) -> list[str]:
    names = {"ps": f"PS ({ps_spec.name})", "dfs": f"DFS ({dfs_spec.name})", "chain": f"PS then DFS ({ps_spec.name})"}
    return [names[s] for s in SPACE_NAMES if s in spaces]


def searches_of_seed(seed: int, budget: int, sampler: str, spaces: list[str], ps_path: Path,
                     dfs_path: Path) -> dict[str, dict]:
    _quiet_libraries()
    ps_label, dfs_label, chain_label = (labels(ps_path, dfs_path, [s])[0] for s in SPACE_NAMES)
    results = {}
    if "ps" in spaces:
        chain = SearchSpec.from_yaml(ps_path).model_copy(update={"seed": seed})  # stage 1
        results[ps_label] = one_search(chain, budget)
    if "dfs" in spaces:
        dfs_spec = SearchSpec.from_yaml(dfs_path).model_copy(update={"seed": seed, "sampler": sampler})
        results[dfs_label] = one_search(dfs_spec, budget)
    if "chain" in spaces:
        with tempfile.TemporaryDirectory() as tmp:
            winner = Path(tmp) / "ps-winner"
            merge_to_folder(results[ps_label]["recipe"], winner)
            stage = chain.dataflow_stage(str(winner)).model_copy(update={"sampler": sampler})
            results[chain_label] = one_search(stage, budget)
    for label, r in results.items():
        print(f"seed {seed} | {label} | validation {r['validation']:.4f} | test {r['test']:.4f} | {r['shape']} | "
              f"{r['seconds']:.0f} s | {r['path']}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sampler", choices=("cmaes", "tpe"), default="cmaes", help="the data-flow searches'")
    parser.add_argument("--parallel", action="store_true", help="one process per seed, all at once")
    parser.add_argument("--spaces", nargs="+", choices=SPACE_NAMES, default=list(SPACE_NAMES),
                        help="which searches run (chain needs ps)")
    parser.add_argument("--ps-spec", type=Path, default=SPACES / "ps_then_dfs.yaml",
                        help="weight-space spec (PS, and the chain's stage 1; needs then: for chain)")
    parser.add_argument("--dfs-spec", type=Path, default=SPACES / "dataflow.yaml", help="data-flow spec (DFS)")
    args = parser.parse_args()
    if "chain" in args.spaces and "ps" not in args.spaces:
        parser.error("--spaces chain needs ps (its first stage)")
    jobs = [(seed, args.budget, args.sampler, args.spaces, args.ps_spec, args.dfs_spec) for seed in args.seeds]
    results = per_seed(searches_of_seed, jobs, args.parallel)
    first = next(iter(results[0].values()))
    print(f"\nbudget {args.budget}, seeds {args.seeds}, data-flow sampler {args.sampler}; "
          f"uniform average test {first['uniform_test']:.4f}")
    print_seed_table(results, labels(args.ps_spec, args.dfs_spec, args.spaces), "shape")


if __name__ == "__main__":
    main()
