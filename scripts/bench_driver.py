"""Benchmark the search driver at cluster scale: a sleep-only executor stands in for 8 to 256 workers.

No model is loaded. Each submitted candidate "finishes" after a duration drawn uniformly from
[--low, --high] seconds times --scale (real candidates take 20-60 s; the scale shrinks that so a run takes
seconds) and scores a cheap deterministic function of its recipe's weights, so the samplers have something
to optimize. Jobs finish in real time (a heap of finish times on ``time.monotonic()``; ``wait_any`` sleeps
until the earliest one), so when the driver is slower than the workers, finished jobs wait for it and the
workers idle: the driver's real cost is what limits utilization.

The real loop runs: ``Search.run_budget`` on a real Optuna study (SQLite in a temporary run folder made by
``prepare_run``), demo spec with screening off, per sampler and worker count. Measured per case:

* driver ms/trial: wall time of ``run_budget`` minus the time ``wait_any`` spent asleep, over the candidates
  evaluated (ask + sample + tell + storage writes + trial log); p90 and the growth with the study's size come
  from the steady-state loop iterations (one tell and one ask each);
* utilization: busy time of the simulated workers / (workers x wall), over the steady state (until the
  last candidate is handed out) and over the whole run (the final drain, where the budget leaves slots
  empty, included);
* sustain vs demand: the throughput the driver can sustain (1 / cost per trial) against what the workers
  demand (workers / mean candidate time); break-even = workers x cost per trial, the candidate time below
  which the driver is the bottleneck.

    python scripts/bench_driver.py [--workers 8,64,256] [--samplers cmaes,tpe] [--scale 0.01] [--seed 0]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import optuna  # noqa: E402

from evomerge.cli import _quiet_libraries  # noqa: E402
from evomerge.demo import DEMO_SPEC  # noqa: E402
from evomerge.evaluate import EvalResult  # noqa: E402
from evomerge.events import Progress  # noqa: E402
from evomerge.executors import Job, Outcome  # noqa: E402
from evomerge.launch import prepare_run  # noqa: E402
from evomerge.recipes import Recipe  # noqa: E402
from evomerge.run import RunFolder, counted  # noqa: E402
from evomerge.search import Search  # noqa: E402
from evomerge.spec import SearchSpec  # noqa: E402

REAL_MEAN_S = 40.0  # the mean of a real candidate's 20-60 s, for the conclusion


# ----------------------------------------------------------------------------- the sleep-only executor


def recipe_scores(recipe: Recipe, tasks: list[str]) -> dict[str, float]:
    """Task k prefers its own model's weights high (0.7) and the others low (0.3): a smooth bowl per task."""
    per_model: list[list[float]] = []
    for entry in recipe.models:
        weight = (entry.parameters or {}).get("weight", 1.0)
        values = weight if isinstance(weight, list) else [weight]
        per_model.append([float(v.value if hasattr(v, "value") else v) for v in values])
    scores = {}
    for k, task in enumerate(tasks):
        errors = [(x - (0.7 if i == k else 0.3)) ** 2 for i, xs in enumerate(per_model) for x in xs]
        scores[task] = 1.0 - sum(errors) / max(1, len(errors))
    return scores


@dataclass
class SleepExecutor:
    """Implements the ``Executor`` protocol with ``slot_count`` simulated workers: a job's duration is drawn at
    submit, it finishes at submit time + duration (real, monotonic clock), ``wait_any`` sleeps until the
    earliest finish and returns that job. Records every job's busy span and the time spent asleep."""

    slot_count: int
    low_s: float
    high_s: float
    tasks: list[str]
    task_weights: dict[str, float]
    examples: int = 500
    seed: int = 0
    name: str = "sleep"
    slept_s: float = 0.0
    spans: list[tuple[float, float]] = field(default_factory=list)  # (submit, finish) of every job
    waits: list[tuple[float, float]] = field(default_factory=list)  # (enter, leave) of every wait_any

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._heap: list[tuple[float, int]] = []
        self._jobs: dict[int, Job] = {}

    def slots(self) -> int:
        return self.slot_count

    def can_submit(self) -> bool:
        return len(self._jobs) < self.slot_count

    def busy(self) -> int:
        return len(self._jobs)

    def workers(self) -> tuple[int, int]:
        return len(self._jobs), self.slot_count

    def doc_ids(self, task: str, role: str) -> list[int]:
        return list(range(self.examples))

    def submit(self, key: int, candidate: Job) -> None:
        if key in self._jobs or len(self._jobs) >= self.slot_count:
            raise RuntimeError(f"job {key} submitted twice or with every slot busy")
        now = time.monotonic()
        finish = now + self._rng.uniform(self.low_s, self.high_s)
        self._jobs[key] = candidate
        heapq.heappush(self._heap, (finish, key))
        self.spans.append((now, finish))

    def wait_any(self) -> tuple[int, Outcome]:
        enter = time.monotonic()
        finish, key = heapq.heappop(self._heap)
        if finish > enter:
            time.sleep(finish - enter)
            self.slept_s += time.monotonic() - enter
        job = self._jobs.pop(key)
        scores = recipe_scores(job.recipe, self.tasks)
        ids = job.doc_ids or {t: self.doc_ids(t, job.role) for t in self.tasks}
        # per-example scores, as a real worker sends back (the driver receives and stores their count)
        result = EvalResult(scores, {t: dict.fromkeys(ids[t], scores[t]) for t in self.tasks}, self.task_weights)
        self.waits.append((enter, time.monotonic()))
        return key, Outcome(result, "full", None, 0.0, 0.0, self.name)

    def close(self) -> None:
        self._heap.clear()
        self._jobs.clear()


# ----------------------------------------------------------------------------- timing the driver's parts


class Timers:
    """Total seconds per label of wrapped calls; ``storage`` counts only the outermost storage call."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.storage_calls = 0
        self._depth = 0

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        return timed

    def wrap_outermost(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            self.storage_calls += self._depth == 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds[label] += time.perf_counter() - start

        return timed


def instrument(search: Search, timers: Timers) -> Callable[[], None]:
    """Time ask, sample, set_user_attr, tell and the trial log (disjoint parts of the loop) and every storage
    call (which happen inside them); returns a function that undoes the class-level patch."""
    study = search.study
    study.ask = timers.wrap("ask", study.ask)
    study.tell = timers.wrap("tell", study.tell)
    search.space.sample = timers.wrap("sample", search.space.sample)
    search._log = timers.wrap("log", search._log)
    storage = study._storage
    for name in dir(type(storage)):
        if not name.startswith("_") and callable(getattr(storage, name)):
            setattr(storage, name, timers.wrap_outermost("storage", getattr(storage, name)))
    original = optuna.trial.Trial.set_user_attr
    optuna.trial.Trial.set_user_attr = timers.wrap("set_user_attr", original)

    def undo() -> None:
        optuna.trial.Trial.set_user_attr = original

    return undo


# ----------------------------------------------------------------------------- one case


@dataclass
class Case:
    sampler: str
    workers: int
    budget: int
    trials: int  # rows in the study (duplicates, failures and baselines included)
    evaluated: int  # candidates handed to the executor
    mean_job_s: float
    wall_s: float
    driver_s: float
    steady_ms: list[float]  # driver time of each steady-state iteration (one tell, one ask)
    quartile_ms: list[float]  # mean of steady_ms per quarter of the run
    ramp_ms: float  # per candidate, the first dispatch of ``workers`` candidates
    util_steady: float
    util_all: float
    parts: dict[str, float]  # ms per evaluated candidate
    storage_calls: float  # per evaluated candidate
    best: float | None
    cma_waste: float | None  # CMA-ES: share of closed generations' trials the optimizer never used

    @property
    def ms_per_trial(self) -> float:
        return 1000 * self.driver_s / self.evaluated

    @property
    def p90_ms(self) -> float:
        return statistics.quantiles(self.steady_ms, n=10)[-1] if len(self.steady_ms) >= 10 else math.nan

    @property
    def steady_ms_mean(self) -> float:
        """Cost of one steady-state iteration (one tell, one ask): the first fill of the slots is cheaper
        per candidate (fewer trials in flight) and so is the drain (tells only), so the overall mean
        understates what the driver costs while every worker is in use."""
        return statistics.fmean(self.steady_ms) if len(self.steady_ms) >= 8 else self.ms_per_trial

    @property
    def sustain(self) -> float:
        return 1000 / self.steady_ms_mean

    @property
    def demand(self) -> float:
        return self.workers / self.mean_job_s

    @property
    def break_even_s(self) -> float:
        return self.workers * self.steady_ms_mean / 1000


def busy_within(spans: list[tuple[float, float]], start: float, stop: float) -> float:
    return sum(max(0.0, min(b, stop) - max(a, start)) for a, b in spans)


def cma_generations(trials: list[optuna.trial.FrozenTrial], sampler: optuna.samplers.CmaEsSampler) -> Counter[int]:
    """How many of ``trials`` CMA-ES sampled in each of its generations (the generation it records per trial)."""
    key = sampler._attr_key_generation
    return Counter(t.system_attrs[key] for t in trials if key in t.system_attrs)


def cma_waste(search: Search) -> float | None:
    """Trials of CMA-ES generations that closed, beyond the population the optimizer was told."""
    sampler = search.study.sampler
    if not isinstance(sampler, optuna.samplers.CmaEsSampler):
        return None
    per_gen = cma_generations(search.study.get_trials(deepcopy=False), sampler)
    closed = [n for g, n in per_gen.items() if g < max(per_gen, default=0)]
    return sum(n - sampler._popsize for n in closed) / sum(closed) if closed else math.nan


def run_case(base: SearchSpec, sampler: str, workers: int, budget: int, low_s: float, high_s: float,
             seed: int, root: Path) -> Case:
    evaluation = base.evaluation.model_copy(update={"screen_examples": None})
    spec = base.model_copy(update={"sampler": sampler, "seed": seed, "evaluation": evaluation})
    tasks = [t.name for t in spec.evaluation.tasks]
    executor = SleepExecutor(workers, low_s, high_s, tasks, spec.evaluation.weights,
                             examples=spec.evaluation.search_examples or 500, seed=seed)
    run = RunFolder(root / f"{sampler}-{workers}")
    prepare_run(spec, run, budget, force=False)
    search = Search(spec, run, executor)
    timers = Timers()
    undo = instrument(search, timers)
    best: list[float | None] = [None]

    def on_progress(p: Progress) -> None:  # what the CLI's display asks for, every iteration
        best[0] = p.best

    try:
        start = time.monotonic()
        search.run_budget(budget, on_progress)
        stop = time.monotonic()
    finally:
        undo()
    wall = stop - start
    spans, waits = executor.spans, executor.waits
    evaluated = len(spans)
    last_submit = max(a for a, _ in spans)
    # the driver's work between one wait_any and the next, while every freed slot is refilled
    gaps = [(nxt[0] - prev[1]) * 1000 for prev, nxt in zip(waits, waits[1:], strict=False) if nxt[0] <= last_submit]
    quarter = max(1, len(gaps) // 4)
    quartiles = [statistics.fmean(gaps[i * quarter:(i + 1) * quarter]) if gaps[i * quarter:(i + 1) * quarter]
                 else math.nan for i in range(4)]
    trials = search.study.get_trials(deepcopy=False)
    if sum(counted(t) for t in trials) < budget:
        raise RuntimeError(f"{sampler} with {workers} workers did not count its budget")
    return Case(
        sampler=sampler, workers=workers, budget=budget, trials=len(trials), evaluated=evaluated,
        mean_job_s=statistics.fmean(b - a for a, b in spans), wall_s=wall, driver_s=wall - executor.slept_s,
        steady_ms=gaps, quartile_ms=quartiles,
        ramp_ms=1000 * (waits[0][0] - start) / min(workers, budget) if waits else math.nan,
        util_steady=busy_within(spans, start, last_submit) / (workers * (last_submit - start)),
        util_all=busy_within(spans, start, stop) / (workers * wall),
        parts={k: 1000 * v / evaluated for k, v in timers.seconds.items()},
        storage_calls=timers.storage_calls / evaluated,
        best=best[0], cma_waste=cma_waste(search),
    )


# ----------------------------------------------------------------------------- report


def conclusion(sampler: str, cases: list[Case]) -> str:
    """Where the driver limits utilization, and, from a straight-line fit of cost per trial against workers
    (it grows with the trials in flight), how many workers real 40 s candidates can keep busy."""
    limited = [f"{c.workers} workers below {c.break_even_s:.2g} s" for c in cases]
    bottleneck = [c.workers for c in cases if c.sustain < c.demand]
    growth = ", ".join(f"{c.quartile_ms[0]:.0f}->{c.quartile_ms[-1]:.0f} ms ({c.workers} workers, {c.trials} trials)"
                       for c in cases if len(c.steady_ms) >= 8)
    text = (f"**{sampler}**: the driver limits utilization when the mean candidate time is {', '.join(limited)} "
            f"(workers x steady cost per trial); at the scaled candidate time it was the bottleneck at "
            f"{bottleneck or 'no'} workers.")
    if len(cases) >= 2:
        xs, ys = [c.workers for c in cases], [c.steady_ms_mean for c in cases]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / max(
            1e-9, sum((x - mx) ** 2 for x in xs))
        intercept = my - slope * mx
        # workers W saturate the driver when W x cost(W) = mean candidate time
        a, b, c0 = max(slope, 0.0), max(intercept, 0.0), -REAL_MEAN_S * 1000
        limit = (-b + math.sqrt(b * b - 4 * a * c0)) / (2 * a) if a > 0 else -c0 / max(b, 1e-9)
        text += (f" Steady cost per trial ~ {intercept:.0f} + {slope:.2f} x workers ms, so real {REAL_MEAN_S:.0f} s "
                 f"candidates saturate the driver at about {limit:.0f} workers.")
    return text + f" Steady-state cost per iteration, first -> last quarter: {growth or 'too few iterations'}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="8,64,256", help="comma-separated worker counts")
    parser.add_argument("--samplers", default="cmaes,tpe",
                        help="comma-separated: cmaes, cmaes-generations, tpe, random")
    parser.add_argument("--low", type=float, default=20.0, help="shortest candidate, seconds before scaling")
    parser.add_argument("--high", type=float, default=60.0, help="longest candidate, seconds before scaling")
    parser.add_argument("--scale", type=float, default=0.01,
                        help="candidate time factor (0.01: 0.2-0.6 s, mean 0.4 s; 1: real time)")
    parser.add_argument("--rounds", type=int, default=3, help="budget = rounds x workers ...")
    parser.add_argument("--max-budget", type=int, default=300, help="... but at most this many trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                        help="where the temporary run folders go (default /dev/shm, in memory: the driver's CPU "
                             "cost; a disk folder such as /tmp adds SQLite's fsyncs)")
    parser.add_argument("--json", type=Path, help="write a summary per case here (a list of objects)")
    args = parser.parse_args()
    _quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = SearchSpec.from_yaml(DEMO_SPEC)
    workers = [int(w) for w in args.workers.split(",")]
    samplers = args.samplers.split(",")
    low_s, high_s = args.low * args.scale, args.high * args.scale
    print(f"candidate time uniform {low_s:.3g}-{high_s:.3g} s (x{args.scale:g} of {args.low:g}-{args.high:g} s); "
          f"budget {args.rounds} x workers, at most {args.max_budget}; run folders in {args.root or 'temp'}; "
          f"cores {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, list[Case]] = {}
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        for sampler in samplers:
            for w in workers:
                budget = min(args.rounds * w, args.max_budget)
                case = run_case(base, sampler, w, budget, low_s, high_s, args.seed, Path(tmp))
                results.setdefault(sampler, []).append(case)
                print(f"{sampler} x{w}: {case.evaluated} candidates in {case.wall_s:.1f} s, "
                      f"{case.ms_per_trial:.1f} ms/trial, utilization {100 * case.util_steady:.0f}% "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)

    print("\n| sampler | workers | trials | cand. s (mean) | driver ms/trial mean | steady ms/trial mean | p90 "
          "| first->last quarter | util. steady % | util. whole run % | sustain trials/s | demand trials/s "
          "| break-even cand. s | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cases in results.values():
        for c in cases:
            print(f"| {c.sampler} | {c.workers} | {c.trials} | {c.mean_job_s:.3f} | {c.ms_per_trial:.1f} | "
                  f"{c.steady_ms_mean:.1f} | {c.p90_ms:.1f} | {c.quartile_ms[0]:.1f}->{c.quartile_ms[-1]:.1f} | "
                  f"{100 * c.util_steady:.0f} | "
                  f"{100 * c.util_all:.0f} | {c.sustain:.0f} | {c.demand:.0f} | {c.break_even_s:.2f} | "
                  f"{c.wall_s:.1f} |")
    labels = ["ask", "sample", "set_user_attr", "tell", "log", "storage"]
    print("\nwhere the driver's time goes, ms per candidate (storage: every call into Optuna's storage, inside "
          "the others); first dispatch = ms per candidate of the initial fill of every slot\n")
    print("| sampler | workers | " + " | ".join(labels) + " | other | storage calls | first dispatch "
          "| CMA-ES waste % | best |")
    print("|---|---|" + "---|" * (len(labels) + 5))
    for cases in results.values():
        for c in cases:
            other = c.ms_per_trial - sum(c.parts.get(k, 0.0) for k in labels[:-1])
            waste = "-" if c.cma_waste is None or math.isnan(c.cma_waste) else f"{100 * c.cma_waste:.0f}"
            best = "-" if c.best is None else f"{c.best:.4f}"
            print(f"| {c.sampler} | {c.workers} | " + " | ".join(f"{c.parts.get(k, 0.0):.2f}" for k in labels)
                  + f" | {other:.2f} | {c.storage_calls:.1f} | {c.ramp_ms:.1f} | {waste} | {best} |")
    print()
    for sampler, cases in results.items():
        print(conclusion(sampler, cases))
    if args.json:
        args.json.write_text(json.dumps([summary(c) for cases in results.values() for c in cases], indent=1))


def summary(case: Case) -> dict[str, Any]:
    """One case for ``--json``: driver_ms_per_trial is the steady-state cost (one tell and one ask)."""
    return {"sampler": case.sampler, "workers": case.workers, "trials": case.trials,
            "driver_ms_per_trial": case.steady_ms_mean, "driver_ms_per_trial_whole_run": case.ms_per_trial,
            "p90_ms": case.p90_ms, "utilization_steady": case.util_steady, "cma_waste": case.cma_waste}


if __name__ == "__main__":
    main()
