"""How many scored examples does a search need? On a spec (default: the demo's), the same sampler, budget and
seeds with the evaluation knobs that set a candidate's cost: every search example (full fidelity), a
screen then the rest, smaller search subsets with and without a screen, and races over several rungs (the
paired test at each). Each search ends as
`evomerge search` does (top-k re-scored on validation, the winner scored on test), so a cheap fitness can
mislead the sampler but not the final pick.

Prints, per strategy, the examples scored during the search (mean over seeds, and the ratio to full
fidelity), the winner's validation and test scores (mean ± sd), the examples it took until the best-so-far
trial reached full fidelity's mean final test score, and the wall time; writes a PNG of best-so-far test
score against examples scored.

    python scripts/bench_fitness.py [--spec search_spaces/demo.yaml] [--budget 200] [--seeds 0 1 2]
                                    [--step 20] [--png scripts/bench_fitness.png] [--strategies LABEL ...]
                                    [--full TEST EXAMPLES]  (full fidelity's figures from an earlier run)
    python scripts/bench_fitness.py --fidelity 100 [--sizes 25 50 100]   (each subset against the pool)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench_search import searched, test_score  # noqa: E402  (this folder: a script's own directory is on sys.path)

from evomerge.cli import _quiet_libraries  # noqa: E402
from evomerge.demo import DEMO_SPEC  # noqa: E402
from evomerge.executors import InProcessExecutor
from evomerge.launch import prepare_run  # noqa: E402
from evomerge.recipes import parse_recipe  # noqa: E402
from evomerge.run import Attr, RunFolder, structured_attr  # noqa: E402
from evomerge.search import Search  # noqa: E402
from evomerge.spec import SearchSpec  # noqa: E402
from evomerge.worker import Worker

# label: (search_examples, screen_examples, subset_pool) per task; a list of screens is a race over those rungs;
# with a pool, the search documents are drawn from strata of the reference models' answers on that many
STRATEGIES = {
    "full (500)": (500, None, None),
    "screen 100, then 500 (the demo before)": (500, 100, None),
    "subset 100": (100, None, None),
    "subset 100, screen 25": (100, 25, None),
    "subset 50": (50, None, None),
    "race 25, 100, then 500": (500, [25, 100], None),
    "subset 100, race 10, 25 (the demo)": (100, [10, 25], None),
    "answers 100 of 500, race 10, 25": (100, [10, 25], 500),
    "answers 100 of 300, race 10, 25": (100, [10, 25], 300),
    "answers 50 of 500": (50, None, 500),
    "answers 50 of 500, race 10, 25": (50, [10, 25], 500),
}
FULL = "full (500)"


def one_search(spec: SearchSpec, executor: InProcessExecutor, budget: int, step: int) -> dict:
    """Search and finalize; the winner's scores, the examples scored, and the best-so-far trial's test score
    (by search score, among full-fidelity trials) after every ``step`` counted trials."""
    with searched(spec, executor, budget) as (search, search_seconds):
        start = time.perf_counter()
        summary = search.finalize()
        seconds = search_seconds + time.perf_counter() - start
        trials = sorted(search.study.get_trials(deepcopy=False), key=lambda t: t.number)
        examples = search.study.user_attrs.get(Attr.SUBSET_EXAMPLES, 0)  # the reference models' answers first
    curve, cache, best, counted_trials = [], {}, None, 0
    for t in trials:
        examples += t.user_attrs.get(Attr.EXAMPLES, 0)
        if t.value is None or Attr.DUPLICATE_OF in t.user_attrs:
            continue
        counted_trials += 1
        if t.user_attrs.get(Attr.FIDELITY) == "full" and (best is None or t.value > best.value):
            best = t
        if counted_trials % step == 0 and best is not None:
            if best.number not in cache:
                cache[best.number] = test_score(executor.worker, parse_recipe(structured_attr(best, Attr.RECIPE)))
            curve.append((examples, cache[best.number]))
    winner = summary["table"][f"winner (trial {summary['winner_trial']})"]
    return {"validation": winner["validation"], "test": winner["test"], "examples": examples, "curve": curve,
            "seconds": seconds}


def subset_fidelity(base: SearchSpec, executor: InProcessExecutor, candidates: int, sizes: list[int]) -> None:
    """How well each search subset stands in for the 500-document pool: random candidates of the spec's space
    scored on the whole pool, each subset's score (FirstDocuments: plain mean of the first n; AnswerStrata:
    drawn and weighted from the reference models' answers) against the pool's; prints mean absolute error and
    Spearman's rank correlation over the candidates."""
    import optuna
    from scipy.stats import spearmanr

    from evomerge.evaluate import EvalResult
    from evomerge.executors import Job
    from evomerge.subsets import AnswerStrata, FirstDocuments

    with tempfile.TemporaryDirectory() as tmp:
        run = RunFolder(Path(tmp) / "run")
        prepare_run(base, run, 1, force=False)
        search = Search(base, run, executor=executor)
        pool = search.pool(500)
        refs = search.reference_answers(pool)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        scored = [executor.worker.run(Job(search.space.sample(study.ask()), "search", pool)).result
                  for _ in range(candidates)]
    print(f"\nsubset fidelity, {base.evaluation.tasks[0].name}..., {candidates} random candidates, pool 500 per task")
    print("| subset | examples per task | mean abs error vs pool score | Spearman rank correlation |")
    print("|---|---|---|---|")
    truth = [r.score for r in scored]
    for n in sizes:
        for label, subset in (("first", FirstDocuments({t: ids[:n] for t, ids in pool.items()})),
                              ("answers", AnswerStrata.from_answers(pool, refs, n))):
            estimates = []
            for r in scored:
                part = {t: {d: r.examples[t][d] for d in subset.doc_ids[t]} for t in pool}
                plain = EvalResult({t: sum(v.values()) / len(v) for t, v in part.items()}, part, r.weights)
                estimates.append(subset.weigh(plain).score)
            error = statistics.mean(abs(e - t) for e, t in zip(estimates, truth, strict=True))
            print(f"| {label} | {n} | {error:.4f} | {spearmanr(estimates, truth).statistic:.3f} |", flush=True)


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEMO_SPEC)
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--step", type=int, default=20)
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("bench_fitness.png"))
    parser.add_argument("--full", type=float, nargs=2, metavar=("TEST", "EXAMPLES"),
                        help="full fidelity's mean final test score and examples scored, when it is not rerun")
    parser.add_argument("--fidelity", type=int, metavar="CANDIDATES",
                        help="only measure each subset against the pool on this many random candidates")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100], help="subset sizes for --fidelity")
    args = parser.parse_args()
    _quiet_libraries()
    base = SearchSpec.from_yaml(args.spec)
    executor = InProcessExecutor(Worker(base))
    if args.fidelity:
        subset_fidelity(base, executor, args.fidelity, args.sizes)
        return
    results: dict[str, list[dict]] = {}
    for label in args.strategies:
        search_examples, screen, pool = STRATEGIES[label]
        evaluation = base.evaluation.model_copy(update={
            "search_examples": search_examples, "screen_examples": screen,
            "subset": "first" if pool is None else "answers", "subset_pool": pool})
        for seed in args.seeds:
            spec = base.model_copy(update={"seed": seed, "evaluation": evaluation})
            result = one_search(spec, executor, args.budget, args.step)
            results.setdefault(label, []).append(result)
            print(f"{label} | seed {seed} | examples {result['examples']} | validation {result['validation']:.4f} | "
                  f"test {result['test']:.4f} | {result['seconds']:.0f} s", flush=True)

    target, full_examples = args.full or (None, None)
    if FULL in results:
        full_examples = statistics.mean(r["examples"] for r in results[FULL])
        target = statistics.mean(r["test"] for r in results[FULL])
    print(f"\n{args.spec.name}, budget {args.budget}, seeds {args.seeds}"
          + (f"; full fidelity's mean final test score {target:.4f}" if target is not None else ""))
    print("| strategy | examples scored (mean) | fewer than full | validation (mean ± sd) | test (mean ± sd) | "
          "examples until best-so-far test >= full's final (per seed) | wall s (mean) |")
    print("|---|---|---|---|---|---|---|")
    for label, runs in results.items():
        examples = statistics.mean(r["examples"] for r in runs)
        ratio = f"{full_examples / examples:.1f}x" if full_examples else "-"
        reach = " ".join(str(next((x for x, score in r["curve"] if score >= target), "never")) for r in runs) \
            if target is not None else "-"
        val, test = [r["validation"] for r in runs], [r["test"] for r in runs]
        print(f"| {label} | {examples:.0f} | {ratio} | {statistics.mean(val):.4f} ± {sd(val):.4f} | "
              f"{statistics.mean(test):.4f} ± {sd(test):.4f} | {reach} | "
              f"{statistics.mean(r['seconds'] for r in runs):.0f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, runs) in enumerate(results.items()):
        color = f"C{i}"
        for j, r in enumerate(runs):
            xs, ys = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
            ax.plot(xs, ys, color=color, alpha=0.8, linewidth=1, label=label if j == 0 else None)
    if target is not None:
        ax.axhline(target, color="gray", linewidth=1, linestyle="--", label="full fidelity's mean final test")
    ax.set_xscale("log")
    ax.set_xlabel("examples scored during the search")
    ax.set_ylabel("test score of best-so-far trial")
    ax.set_title(f"fitness cost, {args.spec.name}, budget {args.budget}, {len(args.seeds)} seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
