"""Running candidates. A Worker owns one live model on one device: it loads the base and task vectors
once, then per candidate merges in place and evaluates. Executors hand candidates to workers; the
in-process one runs a single worker in the driver (a Ray executor plugs into the same interface)."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from evomerge.checkpoint import resolve_model_path
from evomerge.evaluate import EvalResult, Evaluator, TaskRef
from evomerge.merge import DTYPES, LiveMerger
from evomerge.spec import Recipe, SearchSpec


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def include_paths(spec: SearchSpec) -> list[str]:
    """Task folders of a spec, ``demo`` standing for the built-in demo tasks."""
    from evomerge.demo import TASKS_DIR

    return [str(TASKS_DIR) if p == "demo" else p for p in spec.evaluation.include_paths]


def task_refs(spec: SearchSpec) -> list[TaskRef]:
    return [TaskRef(t.name, t.metric, t.weight, dict(t.splits)) for t in spec.evaluation.tasks]


@dataclass
class Scored:
    """A finished evaluation and where its time went."""

    result: EvalResult
    merge_s: float
    eval_s: float


class Worker:
    """One live model: merge a recipe into it in place, then score it on chosen documents."""

    def __init__(self, spec: SearchSpec) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = pick_device(spec.device)
        base = resolve_model_path(spec.base_model)
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[spec.dtype]).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(base)
        self.merger = LiveMerger(self.model, spec.base_model, spec.models)
        self.evaluator = Evaluator(self.model, tokenizer, task_refs(spec), include_paths(spec),
                                   batch_size=spec.evaluation.batch_size)
        gc.collect()
        gc.freeze()  # the model, tasks and cached requests live as long as the worker: keep them out of GC scans

    def doc_ids(self, task: str, role: str) -> list[int]:
        return self.evaluator.doc_ids(task, role)

    def score(self, recipe: Recipe, role: str, doc_ids: dict[str, Sequence[int]] | None = None) -> Scored:
        start = time.perf_counter()
        self.merger.apply(recipe)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        merged = time.perf_counter()
        result = self.evaluator.evaluate(role, doc_ids)
        return Scored(result, merged - start, time.perf_counter() - merged)


class InProcessExecutor:
    """Evaluates candidates one at a time in this process."""

    def __init__(self, spec: SearchSpec) -> None:
        self.worker = Worker(spec)
        self.name = f"in-process:{self.worker.device}"

    def doc_ids(self, task: str, role: str) -> list[int]:
        return self.worker.doc_ids(task, role)

    def score(self, recipe: Recipe, role: str, doc_ids: dict[str, Sequence[int]] | None = None) -> Scored:
        return self.worker.score(recipe, role, doc_ids)
