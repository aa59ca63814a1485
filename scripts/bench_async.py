"""Benchmark the asynchrony penalty: the demo search at 1 to 256 workers, replayed on this CPU.

Each search runs on ``VirtualClockExecutor`` (evomerge.virtual_clock): every candidate is really merged and
scored by one in-process worker, but finishes at a simulated time for W simulated workers (2 s + 0.076 s per
example scored, log-normal noise 0.2: a 1B model on a GPU), so results reach the sampler in the order a cluster
of W workers would give, racing included. Measured per sampler, worker count and seed, at ``--budget``:

* test: the finalized (validated) winner's test score;
* unused_fraction: the share of evaluated trials the sampler never learned from. ``cmaes-generations``
  (Optuna's CMA-ES) updates its distribution on the first ``popsize`` finished trials of the generation it is
  on; trials of a generation it has left, the extra ones of a generation that had more than ``popsize`` in
  flight, the trials of the generation still open at the end, and the enqueued baselines, inform nothing.
  ``cmaes`` (``AsyncCmaEsSampler``) is told finished trials ``popsize`` at a time in the order they finished:
  only the baselines and the last fewer than ``popsize`` go untold. TPE and random read every finished trial
  at each ask: none unused;
* the curve: after each eighth of the budget (in the order results arrived), the test score of the best
  full-fidelity trial so far by search score;
* default: whether it is the sampler a search picks by default (``evomerge.samplers.default_sampler``).

    python scripts/bench_async.py [--workers 1,8,64,256] [--seeds 0 1 2] [--budget 400] [--samplers cmaes,tpe]
        [--json FILE] [--png scripts/bench_async.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import optuna  # noqa: E402
from bench_driver import cma_generations  # noqa: E402  (this folder: a script's own directory is on sys.path)
from bench_search import test_score  # noqa: E402

from evomerge.async_cmaes import AsyncCmaEsSampler  # noqa: E402
from evomerge.cli import _quiet_libraries  # noqa: E402
from evomerge.demo import DEMO_SPEC  # noqa: E402
from evomerge.launch import run_search  # noqa: E402
from evomerge.recipes import parse_recipe  # noqa: E402
from evomerge.run import Attr, RunFolder, counted, structured_attr  # noqa: E402
from evomerge.samplers import default_sampler  # noqa: E402
from evomerge.spec import SearchSpec  # noqa: E402
from evomerge.virtual_clock import VirtualClockExecutor  # noqa: E402
from evomerge.worker import Worker  # noqa: E402

CHECKPOINTS = 8  # points on the best-so-far curve


@dataclass
class Case:
    sampler: str
    workers: int
    seed: int
    budget: int
    default: bool
    test: float
    validation: float
    unused_fraction: float
    curve: list[float]  # test score of the best-so-far trial at each checkpoint
    simulated_s: float  # the simulated cluster's wall time
    wall_s: float  # this machine's


def unused_fraction(study: optuna.Study) -> float:
    """The share of evaluated trials (finished, not duplicates) the sampler never learned from."""
    evaluated = [t for t in study.get_trials(deepcopy=False) if counted(t)]
    sampler = study.sampler
    if isinstance(sampler, AsyncCmaEsSampler):
        told = set(sampler.learned_from(study))
        return 1 - sum(t.number in told for t in evaluated) / len(evaluated)
    if not isinstance(sampler, optuna.samplers.CmaEsSampler):
        return 0.0
    per_generation = cma_generations(evaluated, sampler)
    last = max(per_generation, default=0)  # still open: nothing of it told to the optimizer
    used = sum(min(n, sampler._popsize) for g, n in per_generation.items() if g < last)
    return 1 - used / len(evaluated)


def run_case(worker: Worker, base: SearchSpec, sampler: str, workers: int, seed: int, budget: int,
             root: Path) -> Case:
    spec = base.model_copy(update={"sampler": sampler, "seed": seed})
    clock = VirtualClockExecutor(worker, workers, seed=seed)
    run = RunFolder(root / f"{sampler}-{workers}-{seed}")
    start = time.perf_counter()
    done = run_search(spec, run, budget, clock)
    wall = time.perf_counter() - start
    trials = {t.number: t for t in done.search.study.get_trials(deepcopy=False)}
    arrived = [json.loads(line) for line in run.log.read_text().splitlines()]
    arrived = [trials[row["trial"]] for row in arrived if row["state"] != "fail"]
    cache: dict[int, float] = {}
    curve = []
    for k in (round(budget * (i + 1) / CHECKPOINTS) for i in range(CHECKPOINTS)):
        best = max((t for t in arrived[:k] if t.user_attrs.get(Attr.FIDELITY) == "full"), key=lambda t: t.values[0])
        if best.number not in cache:
            cache[best.number] = test_score(worker, parse_recipe(structured_attr(best, Attr.RECIPE)))
        curve.append(cache[best.number])
    winner = done.summary["table"][f"winner (trial {done.summary['winner_trial']})"]
    return Case(sampler, workers, seed, budget, sampler == default_sampler(spec), winner["test"],
                winner["validation"], unused_fraction(done.search.study), curve, clock.now, wall)


def print_table(cases: list[Case]) -> None:
    def mean_sd(values: list[float]) -> str:
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"

    print("| sampler | workers | test (mean ± sd) | test per seed | unused (mean) | simulated h (mean) "
          "| wall s (mean) |")
    print("|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, int], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.sampler, case.workers), []).append(case)
    for (sampler, workers), group in groups.items():
        print(f"| {sampler}{' (default)' if group[0].default else ''} | {workers} | "
              f"{mean_sd([c.test for c in group])} | {' '.join(f'{c.test:.4f}' for c in group)} | "
              f"{100 * statistics.mean(c.unused_fraction for c in group):.0f}% | "
              f"{statistics.mean(c.simulated_s for c in group) / 3600:.2f} | "
              f"{statistics.mean(c.wall_s for c in group):.0f} |")


def plot(cases: list[Case], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = list(dict.fromkeys(c.sampler for c in cases))
    fig, axes = plt.subplots(1, len(samplers), figsize=(6 * len(samplers), 4), squeeze=False, sharey=True)
    for ax, sampler in zip(axes[0], samplers, strict=True):
        for workers in dict.fromkeys(c.workers for c in cases if c.sampler == sampler):
            group = [c for c in cases if c.sampler == sampler and c.workers == workers]
            xs = [round(group[0].budget * (i + 1) / CHECKPOINTS) for i in range(CHECKPOINTS)]
            ax.plot(xs, [statistics.mean(point) for point in zip(*(c.curve for c in group), strict=True)],
                    marker="o", label=f"{workers} workers")
        ax.set_title(f"{sampler} (mean over seeds)")
        ax.set_xlabel("evaluations (in the order results arrived)")
        ax.set_ylabel("test score of the best-so-far trial")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"plot: {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,8,64,256", help="comma-separated simulated worker counts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=400)
    parser.add_argument("--samplers", default="cmaes,tpe",
                        help="comma-separated: cmaes, cmaes-generations, tpe, random")
    parser.add_argument("--json", type=Path, help="write every case here (a list of objects)")
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("bench_async.png"))
    args = parser.parse_args()
    _quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = SearchSpec.from_yaml(DEMO_SPEC)
    worker = Worker(base)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for sampler in args.samplers.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                for seed in args.seeds:
                    case = run_case(worker, base, sampler, workers, seed, args.budget, Path(tmp))
                    cases.append(case)
                    print(f"{sampler} x{workers} seed {seed}: test {case.test:.4f}, unused "
                          f"{100 * case.unused_fraction:.0f}%, {case.wall_s:.0f} s", flush=True)
                    if args.json:  # kept up to date: a long run leaves what it measured so far
                        args.json.write_text(json.dumps([asdict(c) for c in cases], indent=1))
    print(f"\ndemo spec, budget {args.budget}, seeds {' '.join(map(str, args.seeds))}: the validated winner's "
          "test score")
    print_table(cases)
    plot(cases, args.png)


if __name__ == "__main__":
    main()
