"""Benchmark the per-candidate cost of evaluation: evomerge's live path vs the naive one.

Live path: one worker merges each recipe into the loaded model in place, then runs lm-eval's
``evaluate`` on tasks built once. Naive path: write the merged model to disk, then
``lm_eval.simple_evaluate`` on that folder, per candidate. On the demo zoo's three tasks (test split) at
subset sizes 50, 200 and all (500) per task, or with ``--zoo real`` on the real zoo (SmolLM2-135M and its
experts, scripts/build_real_zoo.py; its four tasks, 50 and 200 documents per task), prints per-candidate
wall time, the part spent in the model's forward passes, the rest (overhead) and its share, and the
speed-up over the naive path.

    python scripts/bench_eval.py [--zoo demo|real] [--candidates 10] [--naive-candidates 2]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import build_real_zoo as real_zoo  # noqa: E402  (this folder)
import torch  # noqa: E402

from evomerge.cli import _quiet_libraries  # noqa: E402
from evomerge.demo import TASKS_DIR  # noqa: E402
from evomerge.executors import Job
from evomerge.merge import merge_to_folder  # noqa: E402
from evomerge.recipes import Recipe  # noqa: E402
from evomerge.spec import SearchSpec  # noqa: E402
from evomerge.worker import Worker


class Zoo(NamedTuple):
    base: str
    models: list[str]
    metrics: dict[str, str]  # task -> metric
    tasks_dir: Path
    sizes: tuple[int, ...]  # documents per task to time


ZOOS = {
    "demo": Zoo("demo:base", ["demo:add", "demo:reverse", "demo:sort"],
                {"demo_add": "acc", "demo_reverse": "acc", "demo_sort": "acc"}, TASKS_DIR, (50, 200, 500)),
    "real": Zoo(str(real_zoo.DEFAULT_OUT / "base"), [str(real_zoo.DEFAULT_OUT / e) for e in real_zoo.EXPERTS],
                real_zoo.METRICS, real_zoo.TASKS_DIR, (50, 200)),
}


class ForwardTimer:
    """Accumulates wall time spent inside the model's forward calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._start = 0.0
        model.register_forward_pre_hook(lambda *_: self._begin())
        model.register_forward_hook(lambda *_: self._end())

    def _begin(self) -> None:
        self._start = time.perf_counter()

    def _end(self) -> None:
        self.seconds += time.perf_counter() - self._start


def random_recipe(models: list[str], rng: random.Random) -> Recipe:
    return Recipe(merge_method="linear", dtype="float32",
                  models=[{"model": m, "parameters": {"weight": [rng.random() for _ in range(4)]}} for m in models])


def score(worker: Worker, rng: random.Random, ids: dict[str, list[int]]) -> float:
    """One candidate on the live path (a failed one would make the timing meaningless); its merge seconds."""
    outcome = worker.run(Job(random_recipe(worker.spec.models, rng), "test", ids))
    if outcome.error:
        raise RuntimeError(outcome.error)
    return outcome.merge_s


def live_path(zoo: str, n_docs: int, candidates: int, rng: random.Random,
              batch_size: int) -> tuple[float, float, float]:
    """Per candidate: wall seconds, seconds inside the model's forward calls, seconds merging in place."""
    chosen = ZOOS[zoo]
    spec = SearchSpec.model_validate({
        "base_model": chosen.base, "models": chosen.models, "evaluation": {
            "include_paths": [str(chosen.tasks_dir)], "tasks": [{"name": t, "metric": m}
                                                                for t, m in chosen.metrics.items()],
            "batch_size": batch_size}})
    worker = Worker(spec)
    timer = ForwardTimer(worker.model)
    ids = {t: worker.doc_ids(t, "test")[:n_docs] for t in chosen.metrics}
    for _ in range(2):  # warm-up: first-call allocations and caches
        score(worker, rng, ids)
    timer.seconds, start = 0.0, time.perf_counter()
    merge_s = sum(score(worker, rng, ids) for _ in range(candidates))
    return (time.perf_counter() - start) / candidates, timer.seconds / candidates, merge_s / candidates


def naive_path(zoo: str, n_docs: int, candidates: int, rng: random.Random, batch_size: int) -> float:
    import lm_eval

    chosen = ZOOS[zoo]
    start = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(chosen.tasks_dir)  # the task YAMLs' data_files are relative to their folder
    try:
        for _ in range(candidates):
            with tempfile.TemporaryDirectory() as tmp:
                out = merge_to_folder(random_recipe(chosen.models, rng), Path(tmp) / "model")
                lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32",
                                        tasks=list(chosen.metrics),
                                        task_manager=lm_eval.tasks.TaskManager(include_path=str(chosen.tasks_dir)),
                                        limit=n_docs, batch_size=batch_size, bootstrap_iters=0, device="cpu")
    finally:
        os.chdir(cwd)
    return (time.perf_counter() - start) / candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=list(ZOOS), default="demo")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--naive-candidates", type=int, default=2, help="0 skips the naive path")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    _quiet_libraries()
    rng = random.Random(0)
    rows = []
    for n_docs in ZOOS[args.zoo].sizes:
        total, model_s, merge_s = live_path(args.zoo, n_docs, args.candidates, rng, args.batch_size)
        naive = naive_path(args.zoo, n_docs, args.naive_candidates, rng, args.batch_size) if args.naive_candidates \
            else float("nan")
        rows.append((n_docs, total, model_s, merge_s, naive))
    print(f"\nper candidate, {len(ZOOS[args.zoo].metrics)} {args.zoo} tasks, batch size {args.batch_size}, "
          f"CPU threads {torch.get_num_threads()}")
    print("| docs per task | live s | model s | overhead s | overhead share | of which merge s | naive s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for n, total, model_s, merge_s, naive in rows:
        over = total - model_s
        print(f"| {n} | {total:.3f} | {model_s:.3f} | {over:.3f} | {over / total:.0%} | {merge_s:.3f} | "
              f"{naive:.2f} | {naive / total:.1f}x |")


if __name__ == "__main__":
    main()
