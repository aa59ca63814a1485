"""Benchmark the search on the demo zoo: best test score vs evaluations for CMA-ES, TPE and random,
with and without multi-fidelity screening, same seed, same space (the built-in demo spec).

After every ``--step`` finished evaluations, the best full-fidelity trial so far (by search score) is
scored on the test split. Prints a table (test score per checkpoint, wall time) and writes a PNG plot.

    python scripts/bench_search.py [--budget 60] [--step 10] [--seed 0] [--png scripts/bench_search.png]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.cli import _quiet_libraries  # noqa: E402
from evomerge.demo import DEMO_SPEC  # noqa: E402
from evomerge.executors import InProcessExecutor, Job
from evomerge.launch import run_search  # noqa: E402
from evomerge.recipes import Recipe, WeightRecipe, parse_recipe  # noqa: E402
from evomerge.run import Attr, RunFolder, counted, structured_attr  # noqa: E402
from evomerge.search import Search  # noqa: E402
from evomerge.spec import SearchSpec  # noqa: E402
from evomerge.worker import Worker

SAMPLERS = ("cmaes", "tpe", "random")


def test_score(worker: Worker, recipe: WeightRecipe) -> float:
    outcome = worker.run(Job(recipe, "test"))
    if outcome.result is None:
        raise RuntimeError(outcome.error)
    return outcome.result.score


def per_seed(searches_of_seed: Callable[..., dict[str, dict]], jobs: list[tuple], parallel: bool) -> list[dict]:
    """Each job's searches (a seed's), one process per job at once when ``parallel``."""
    if parallel:
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            return pool.starmap(searches_of_seed, jobs)
    return [searches_of_seed(*job) for job in jobs]


def print_seed_table(results_per_seed: list[dict[str, dict]], labels: list[str], winners: str) -> None:
    """Markdown rows per search label: validation and test mean +/- sd over seeds, test per seed, each
    seed's ``winners`` field and the mean wall time."""
    def sd(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    print(f"| space | validation (mean ± sd) | test (mean ± sd) | test per seed | {winners} | wall s (mean) |")
    print("|---|---|---|---|---|---|")
    for label in labels:
        results = [seed_results[label] for seed_results in results_per_seed]
        val = [r["validation"] for r in results]
        test = [r["test"] for r in results]
        print(f"| {label} | {statistics.mean(val):.4f} ± {sd(val):.4f} | {statistics.mean(test):.4f} ± "
              f"{sd(test):.4f} | {' '.join(f'{t:.4f}' for t in test)} | {', '.join(r[winners] for r in results)} | "
              f"{statistics.mean(r['seconds'] for r in results):.0f} |")


@contextlib.contextmanager
def searched(spec: SearchSpec, executor: InProcessExecutor, budget: int) -> Iterator[tuple[Search, float]]:
    """A search run to its budget in a temporary run folder (which lives while the block runs), and the
    search's wall time (preparing the run folder included)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        search = run_search(spec, RunFolder(Path(tmp) / "run"), budget, executor, finalize=False).search
        yield search, time.perf_counter() - start


def curve(spec: SearchSpec, executor: InProcessExecutor, budget: int, step: int) -> tuple[list[float], float]:
    """Test score of the best-so-far trial at each checkpoint, and the search's wall time."""
    with searched(spec, executor, budget) as (search, seconds):
        trials = [t for t in search.study.get_trials() if counted(t)]
        cache: dict[int, float] = {}
        points = []
        for k in range(step, budget + 1, step):
            full = [t for t in trials[:k] if t.user_attrs.get(Attr.FIDELITY) == "full"]
            best = max(full, key=lambda t: t.value)
            if best.number not in cache:
                recipe = parse_recipe(structured_attr(best, Attr.RECIPE))
                cache[best.number] = test_score(executor.worker, recipe)
            points.append(cache[best.number])
        return points, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--step", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("bench_search.png"))
    args = parser.parse_args()
    _quiet_libraries()
    base = SearchSpec.from_yaml(DEMO_SPEC)
    executor = InProcessExecutor(Worker(base))
    uniform = test_score(executor.worker, Recipe(merge_method="linear", models=[{"model": m} for m in base.models]))
    results = {}
    for sampler in SAMPLERS:
        for screen in (base.evaluation.screen_examples, None):
            evaluation = base.evaluation.model_copy(update={"screen_examples": screen})
            spec = base.model_copy(update={"sampler": sampler, "seed": args.seed, "evaluation": evaluation})
            label = f"{sampler}{' + screening' if screen else ''}"
            results[label] = curve(spec, executor, args.budget, args.step)
            print(f"{label}: {results[label]}", flush=True)
    checkpoints = list(range(args.step, args.budget + 1, args.step))
    print(f"\ntest score (mean of 3 demo tasks, 500 examples each) of the best-so-far trial; "
          f"uniform average: {uniform:.4f}")
    print("| sampler | " + " | ".join(f"@{k}" for k in checkpoints) + " | wall s |")
    print("|---|" + "---|" * (len(checkpoints) + 1))
    for label, (points, seconds) in results.items():
        print(f"| {label} | " + " | ".join(f"{p:.4f}" for p in points) + f" | {seconds:.0f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (points, _) in results.items():
        ax.plot(checkpoints, points, marker="o", label=label, linestyle="--" if "screening" not in label else "-")
    ax.axhline(uniform, color="gray", linewidth=1, label="uniform average")
    ax.set_xlabel("finished evaluations")
    ax.set_ylabel("test score of best-so-far trial")
    ax.set_title("evomerge demo search")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
